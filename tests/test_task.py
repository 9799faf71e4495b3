import pytest
import torch

from batchfit.errors import ConfigError, TaskError
from batchfit.task import EXAMPLES, Task, batch_size_of, load_example, load_task, move_to
from tests.conftest import make_mlp_task


def test_make_model_copies_a_given_module():
    module = torch.nn.Linear(2, 2)
    task = make_mlp_task(model=module)
    copy = task.make_model()
    assert copy is not module
    with torch.no_grad():
        copy.weight.add_(1)
    assert not torch.equal(copy.weight, module.weight)


def test_batch_wraps_around_a_small_dataset():
    task = make_mlp_task(samples=10)
    inputs, labels = task.batch(range(25))
    assert inputs.shape == (25, 8)
    assert torch.equal(inputs[0], inputs[10])
    assert batch_size_of((inputs, labels)) == 25


def test_a_tensor_dataset_batch_is_what_collating_its_samples_gives():
    from torch.utils.data import TensorDataset, default_collate

    data = TensorDataset(
        torch.randn(10, 3, 2), torch.arange(10), torch.rand(10) > 0.5, torch.randn(10, 1).half()
    )
    task = make_mlp_task()
    indices = [3, 17, 0, 9, 9, 24]  # repeats, and indices past the end wrap around
    fast = task.batch(indices, data=data)
    slow = default_collate([data[index % 10] for index in indices])
    assert type(fast) is type(slow) and len(fast) == len(slow) == 4
    for got, want in zip(fast, slow):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(task.batch(torch.tensor(indices), data=data)[0], slow[0])
    assert torch.equal(task.batch(iter(indices), data=data)[1], slow[1])  # any iterable

    class Doubled(TensorDataset):  # a subclass may change __getitem__: collated sample by sample
        def __getitem__(self, index):
            return tuple(2 * tensor[index] for tensor in self.tensors)

    doubled = task.batch(indices, data=Doubled(*data.tensors))
    assert torch.equal(doubled[0], 2 * slow[0])


def test_move_to_keeps_structure():
    batch = {"x": torch.zeros(2), "pair": (torch.ones(1), 3)}
    moved = move_to(batch, "cpu")
    assert set(moved) == {"x", "pair"} and moved["pair"][1] == 3


def test_optimizer_family():
    assert make_mlp_task().optimizer_family() == "sgd"
    adam = make_mlp_task(optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr))
    assert adam.optimizer_family() == "adam"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("lr", 0, "lr"), ("batch_size", -1, "batch_size"), ("kind", "poetry", "kind")],
)
def test_task_rejects_bad_fields(field, value, words):
    with pytest.raises(TaskError, match=words):
        make_mlp_task(**{field: value})


def test_load_task_from_file(tmp_path):
    path = tmp_path / "mytask.py"
    path.write_text(
        "from tests.conftest import make_mlp_task\n"
        "def build():\n    return make_mlp_task()\n"
        "def not_a_task():\n    return 42\n"
    )
    assert isinstance(load_task(f"{path}:build"), Task)
    with pytest.raises(TaskError, match="returned int"):
        load_task(f"{path}:not_a_task")
    with pytest.raises(TaskError, match="no function 'missing'"):
        load_task(f"{path}:missing")
    with pytest.raises(TaskError, match="does not exist"):
        load_task(f"{tmp_path / 'nope.py'}:build")
    with pytest.raises(TaskError, match="must look like"):
        load_task(str(path))


def test_load_task_takes_a_task_defined_at_the_top_of_a_file(tmp_path):
    path = tmp_path / "toplevel.py"
    path.write_text("from tests.conftest import make_mlp_task\ntask = make_mlp_task()\nlimit = 3\n")
    assert load_task(f"{path}:task").name == "tiny-mlp"
    with pytest.raises(TaskError, match="limit is of type int, not a batchfit.Task or a function"):
        load_task(f"{path}:limit")


def test_a_task_left_unnamed_is_named_after_its_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(
        "from tests.conftest import make_mlp_task\n"
        "def build():\n    return make_mlp_task(name='task')\n"
        "def named():\n    return make_mlp_task(name='mine')\n"
    )
    assert load_task(f"{path}:build").name == "my_model"
    assert load_task(f"{path}:named").name == "mine"  # a name the user gave is kept
    module = tmp_path / "task.py"  # a file called task.py keeps the default
    module.write_text(path.read_text())
    assert load_task(f"{module}:build").name == "task"


def _per_sample_loss(model, batch):
    inputs, labels = batch
    return torch.nn.functional.cross_entropy(model(inputs), labels, reduction="none")


@pytest.mark.parametrize("measure", ["memory", "predict", "throughput", "noise", "train"])
def test_a_loss_without_its_mean_is_named_wherever_it_is_first_used(measure):
    from batchfit.memory.predict import predict_step_memory
    from batchfit.memory.step import measure_step_memory
    from batchfit.noise.measure import measure_noise_scale
    from batchfit.throughput.measure import measure_throughput
    from batchfit.training.config import TrainConfig
    from batchfit.training.loop import train

    task = make_mlp_task(loss=_per_sample_loss)
    run = {
        "memory": lambda: measure_step_memory(task, 8, device="cpu"),
        # not taken for a limit of fake tensors (which falls back to a real step, with a warning)
        "predict": lambda: predict_step_memory(task, 8, fallback=False),
        "throughput": lambda: measure_throughput(task, batch_sizes=[8], device="cpu"),
        "noise": lambda: measure_noise_scale(task, device="cpu", warmup_steps=0),
        "train": lambda: train(task, TrainConfig(global_batch=16, micro_batch=8, steps=1)),
    }[measure]
    # autograd's own words were "grad can be implicitly created only for scalar outputs"
    with pytest.raises(TaskError, match=r"must return a scalar tensor .*got \(8,\).*\.mean\(\)"):
        run()


def test_load_task_from_module():
    assert load_task("batchfit.examples.digits:task").name == "digits"
    with pytest.raises(TaskError, match="no module named"):
        load_task("no_such_package.tasks:build")


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_build_and_take_a_step(name):
    task = load_example(name)
    model = task.make_model()
    loss = task.loss(model, task.batch(range(4)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert task.val_data is not None and len(task.val_data) > 0


def test_unknown_example():
    with pytest.raises(ConfigError, match="digits"):
        load_example("mnist")
