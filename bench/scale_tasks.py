"""Tasks for models nobody in this project wrote, built from configs without downloads.

GPT-2 small / medium / large / XL at sequence 1024 (Hugging Face `transformers` GPT2Config),
a ~1B-parameter Llama-style decoder (LlamaConfig) and a ResNet-50 written in plain torch
(torchvision does not import here) at 224x224. Every task trains with fp32 Adam. Needs
`pip install transformers` for the decoders. Used by bench/bench_predict_scale.py, and by hand:

    batchfit memory bench/scale_tasks.py:gpt2_xl --device cpu --memory-budget 80GiB
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from batchfit.task import Task

SEQUENCE = 1024
GPT2_SIZES = {  # name: (layers, hidden, heads), as in the released GPT-2 checkpoints
    "gpt2_small": (12, 768, 12),
    "gpt2_medium": (24, 1024, 16),
    "gpt2_large": (36, 1280, 20),
    "gpt2_xl": (48, 1600, 25),
}


def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


def _lm_loss(model, batch):
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


def _token_data(vocab: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(vocab, (8, SEQUENCE), generator=generator))


def _gpt2_task(name: str) -> Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, hidden, heads = GPT2_SIZES[name]
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=SEQUENCE)
    return _decoder_task(GPT2LMHeadModel, config, name)


def _decoder_task(model_class, config, name: str) -> Task:
    """A causal language model built from `config` (no download), Adam at 3e-4, batch 8."""

    def model():
        return model_class(config)

    return Task(
        model=model,
        train_data=_token_data(config.vocab_size),
        loss=_lm_loss,
        optimizer=_adam,
        lr=3e-4,
        batch_size=8,
        kind="language-model",
        name=name,
    )


def gpt2_small() -> Task:
    return _gpt2_task("gpt2_small")


def gpt2_medium() -> Task:
    return _gpt2_task("gpt2_medium")


def gpt2_large() -> Task:
    return _gpt2_task("gpt2_large")


def gpt2_xl() -> Task:
    return _gpt2_task("gpt2_xl")


def llama_1b() -> Task:
    """A Llama-style decoder of about 1.0B parameters: 18 layers, hidden 2048, MLP 5504."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=SEQUENCE,
    )
    return _decoder_task(LlamaForCausalLM, config, "llama_1b")


class _Bottleneck(nn.Module):
    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        outputs = width * 4
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.down = None
        if stride != 1 or inputs != outputs:
            self.down = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)), inplace=True)


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016; torchvision's layout, v1.5 stride in the 3x3): 25.6M params."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks, inputs = [], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(count):
                blocks.append(_Bottleneck(inputs, width, stride if index == 0 else 1))
                inputs = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _image_loss(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def resnet50() -> Task:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(4, 3, 224, 224, generator=generator),
        torch.randint(1000, (4,), generator=generator),
    )
    return Task(
        model=ResNet50,
        train_data=data,
        loss=_image_loss,
        optimizer=_adam,
        lr=1e-3,
        batch_size=256,
        kind="image-classification",
        name="resnet50",
    )
