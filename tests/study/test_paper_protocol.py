"""The paper-protocol runner end to end on small generated files in the AliExpress CSV layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.study import paper_protocol
from integrations.moe_ranking.data.aliexpress import CATEGORICAL, NUMERIC


def write_aliexpress(root: Path, country: str, n: int = 160, seed: int = 0) -> None:
    """train.csv / test.csv in the processed layout (MTReclib / the PUB paper's code)."""
    rng = np.random.default_rng(seed)
    folder = root / f"AliExpress_{country}"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        frame = pd.DataFrame({"search_id": np.repeat(np.arange(n // 4), 4)})
        for c in CATEGORICAL:
            frame[c] = rng.integers(0, 6, n)
        for c in NUMERIC:
            frame[c] = rng.random(n).round(4)
        click = (rng.random(n) < 0.3).astype(int)
        frame["click"] = click
        frame["conversion"] = click * (rng.random(n) < 0.3).astype(int)
        frame.to_csv(folder / f"{name}.csv", index=False)


def test_protocol_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_aliexpress(tmp_path / "data", "NL")
    out = tmp_path / "paper_protocol.md"
    argv = ["--data-dir", str(tmp_path / "data"), "--countries", "NL", "--seeds", "0", "1",
            "--epochs", "1", "--cache", str(tmp_path / "cache"), "--out", str(out),
            "--allow-dirty"]  # fmt: skip
    assert paper_protocol.main(argv) == 0
    text = out.read_text()
    # the paper's published averages for NL next to ours, for both models and both methods
    for model, method, paper in (
        ("mmoe", "Equal", "0.7946"),
        ("mmoe", "PUB pareto", "0.7969"),
        ("ple", "Equal", "0.7936"),
        ("ple", "PUB pareto", "0.7979"),
    ):
        rows = [r for r in text.splitlines() if r.startswith(f"| NL | {model} | {method} |")]
        assert len(rows) == 1 and f"| {paper} |" in rows[0], (model, method)
        assert rows[0].rstrip().endswith("| 2 |")  # two seeds
    assert "+0.0023" in text and "+0.0043" in text  # the paper's gains, MMoE and PLE on NL
    runs = sorted((tmp_path / "cache").glob("paper-*/aliexpress-NL/*/*/seed*.json"))
    assert len(runs) == 8
    # The protocol's settings reached the runs: batch 2048, embedding 128, 8 experts.
    import json

    settings = json.loads(runs[0].read_text())["settings"]
    assert settings["batch_size"] == 2048 and settings["embed_dim"] == 128
    assert settings["model_options"]["mmoe"]["num_experts"] == 8
    assert settings["lr"] == 1e-3 and settings["weight_decay"] == 1e-6
    capsys.readouterr()
    assert paper_protocol.main(argv) == 0  # resumes: nothing retrained
    assert "0 to train" in capsys.readouterr().out


def test_missing_data_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert paper_protocol.main(["--data-dir", str(tmp_path), "--countries", "ES"]) == 2
    err = capsys.readouterr().err
    assert "AliExpress data not found" in err and "tianchi" in err


def test_released_switches_reach_the_runs(tmp_path: Path) -> None:
    import json

    write_aliexpress(tmp_path / "data", "NL")
    out = tmp_path / "paper_protocol.md"
    argv = ["--data-dir", str(tmp_path / "data"), "--countries", "NL", "--models", "mmoe",
            "--seeds", "0", "--epochs", "1", "--cache", str(tmp_path / "cache"), "--out", str(out),
            "--allow-dirty", "--released"]  # fmt: skip
    assert paper_protocol.main(argv) == 0
    runs = sorted((tmp_path / "cache").glob("paper-*/aliexpress-NL/mmoe/*/seed0.json"))
    assert {p.parent.name for p in runs} == {"equal", "pub-pareto", "as-released"}
    settings = json.loads(runs[0].read_text())["settings"]
    assert settings["model_transforms"] == ["batchnorm", "xavier-embedding"]
    assert settings["model_options"]["mmoe"]["numeric_dim"] == 128
    assert settings["solve_every"] == 10 and settings["accelerator"] == "cpu"
    text = out.read_text()
    assert "BatchNorm on, numeric projection linear-128, embedding init xavier" in text
    assert "As released (weights 1)" in text


def test_gpu_without_cuda_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    write_aliexpress(tmp_path / "data", "NL")
    argv = ["--data-dir", str(tmp_path / "data"), "--countries", "NL", "--accelerator", "gpu",
            "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert paper_protocol.main(argv) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert paper_protocol.main([*argv[:-4], "--devices", "0"]) == 2


def test_model_transforms() -> None:
    import math

    import torch
    from torch import nn

    from benchmarks.study.model_transforms import apply_transforms
    from integrations.moe_ranking.data import make_synthetic
    from integrations.moe_ranking.models import build_model

    data = make_synthetic(n_train=64, n_val=16, n_test=16, seed=1)
    torch.manual_seed(0)
    model = build_model("mmoe", data, embed_dim=8, numeric_dim=5)
    assert model.inputs.numeric.out_features == 5  # type: ignore[union-attr]
    linears = sum(
        isinstance(m, nn.Linear)
        for s in model.modules() if isinstance(s, nn.Sequential) for m in s
    )  # fmt: skip
    shared_before = sum(p.numel() for p in model.shared_parameters())
    apply_transforms(model, ["batchnorm", "xavier-embedding"])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == linears
    for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
        layers = list(seq)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                assert isinstance(layers[i + 1], nn.BatchNorm1d)
    assert sum(p.numel() for p in model.shared_parameters()) > shared_before  # experts' BNs
    weight = model.inputs.embedding.weight  # type: ignore[union-attr]
    bound = math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))
    assert float(weight.abs().max()) <= bound and float(weight.std()) > 0.5 * bound / math.sqrt(3)
    from integrations.moe_ranking.data import make_loader

    out = model(next(iter(make_loader(data.train, 32, shuffle=False))))
    assert set(out) == set(data.task_names)
    with pytest.raises(ValueError, match="unknown model transform"):
        apply_transforms(model, ["dropout"])
