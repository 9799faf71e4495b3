"""`read_history` and `diagnose` on logs written by the real frameworks: Lightning's CSVLogger and
the Hugging Face Trainer's trainer_state.json (tiny models, a few steps, nothing downloaded)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from batchfit.cli.main import main
from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.readers import read_history


def test_lightning_csv_logger_run_is_read_and_diagnosed(tmp_path, capsys):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
            )

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 8, generator=generator)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    data = TensorDataset(inputs, labels)
    loggers = [pl.loggers.CSVLogger(str(tmp_path), name="run", version=0)]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:  # the same run through both loggers
        loggers.append(pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=24, logger=loggers, log_every_n_steps=1,
        val_check_interval=8, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(
        Classifier(),
        DataLoader(data, batch_size=16),
        DataLoader(TensorDataset(inputs[:64], labels[:64]), batch_size=64),
    )
    folder = tmp_path / "run" / "version_0"
    assert (folder / "metrics.csv").exists()  # written by Lightning itself

    history = read_history(folder)
    assert history.format == "lightning"
    assert len(history.train_loss) == 24  # one logged loss per optimizer step
    assert history.val_loss is not None and history.val_loss.steps == (8, 16, 24)
    assert all(math.isfinite(value) for value in history.train_loss.values)
    diagnosis = diagnose(history)
    assert "diverging" not in {finding.kind for finding in diagnosis.findings}

    assert main(["diagnose", str(folder), "--json"]) == 0
    assert '"findings"' in capsys.readouterr().out
    if len(loggers) > 1:
        # its TensorBoardLogger counts steps from 0 as the CSVLogger does: read the same way
        # (they read one step earlier: a validation at step 7, advice to train 7 steps)
        events = read_history(tmp_path / "tb" / "version_0")
        assert events.format == "tensorboard"
        assert events.train_loss.steps == history.train_loss.steps
        assert events.val_loss.steps == (8, 16, 24)


def test_transformers_trainer_state_is_read_and_diagnosed(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (96, 16), generator=generator)
    data = [{"input_ids": row, "labels": row.clone()} for row in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1, max_steps=12, per_device_train_batch_size=8, disable_tqdm=True,
        eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=16, learning_rate=1e-3,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    trainer.save_state()  # output_dir/trainer_state.json, the Trainer's own file
    assert (tmp_path / "trainer_state.json").exists()

    history = read_history(tmp_path)
    assert history.format == "transformers"
    assert history.train_loss.steps == tuple(range(1, 13))
    assert history.val_loss is not None and history.val_loss.steps == (4, 8, 12)
    # A language model at rate 1e-3 for 12 steps learns: the loss falls.
    assert history.train_loss.values[-1] < history.train_loss.values[0]
    assert "diverging" not in {finding.kind for finding in diagnose(history).findings}


def test_transformers_run_that_cannot_learn_is_named_during_warmup(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # a zero last layer norm and head: uniform logits, every gradient 0
        for tensor in (model.transformer.ln_f.weight, model.transformer.ln_f.bias,
                       model.lm_head.weight):  # fmt: skip
            tensor.zero_()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (96, 16), generator=generator)
    data = [{"input_ids": row, "labels": row.clone()} for row in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[],
        logging_steps=1, max_steps=12, per_device_train_batch_size=8, disable_tqdm=True,
        learning_rate=1e-3, warmup_steps=100,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_state()
    # was: healthy (the rate was still warming up, so nothing but divergence was judged)
    (finding,) = diagnose(read_history(tmp_path)).findings
    assert (finding.kind, finding.severity) == ("underfitting", "critical")
    assert finding.summary.startswith("not learning: the training loss is ")
    assert "at all 12 logged steps (1-12), and the gradient norm was 0" in finding.summary
