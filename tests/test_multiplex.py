"""Multiplexing: ConcatPlexer and Image Multiplexer as models, as paths (mux=N), in training, sweeps and the server."""

from __future__ import annotations

import asyncio
import io
import math

import numpy as np
import pytest
import torch
from helpers import LABELS, PATCH, SIZE, D, Shapes, require, tiny_vit
from PIL import Image

from dynavit.config import ConfigError, ExecConfig, resolve
from dynavit.cost.flops import count
from dynavit.errors import DynavitError
from dynavit.multiplex import build, load_multiplexer, reduction, save_multiplexer
from dynavit.train.loop import Recipe
from dynavit.train.multiplex import Distill, slot_shuffle, train_multiplex


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("arch, kw", [("concatplexer", {}), ("imagemux", {}),
                                      ("imagemux", {"keys": "ortho", "demux": "mlp", "learn_keys": True})])
@pytest.mark.parametrize("n", [2, 4])
def test_groups_and_blank_padding(arch, kw, n) -> None:
    m = build(tiny_vit(), arch, n, **kw).eval()
    x = images(2 * n + 1)
    out = logits(m, x)
    assert out.shape == (2 * n + 1, LABELS) and torch.isfinite(out).all()
    # the rule: consecutive groups of n, the last one padded with blank (all-zero) images whose outputs are dropped
    for g in range(2):
        assert torch.allclose(out[g * n:(g + 1) * n], logits(m, x[g * n:(g + 1) * n]), atol=1e-5)
    last = torch.cat([x[2 * n:], torch.zeros(n - 1, 3, SIZE, SIZE)])
    assert torch.allclose(out[2 * n:], logits(m, last)[:1], atol=1e-5)
    # replacing image 0 changes output 0; concatenation keeps it apart from its partners (superposition does not)
    y = x[:n].clone()
    y[0] = images(1, seed=9)[0]
    delta = (logits(m, y) - out[:n]).abs().sum(-1)
    assert delta[0] > 0 and (arch == "imagemux" or delta[0] > delta[1:].max())


def test_reduction_and_token_counts() -> None:
    assert [reduction(n) for n in (2, 3, 4, 8, 9)] == [(2, 1), (3, 1), (2, 2), (4, 2), (3, 3)]
    m = build(tiny_vit(), "concatplexer", 2).eval()
    seqs = []
    hook = m.vit.blocks[1].register_forward_pre_hook(lambda _m, a: seqs.append(a[0].shape))
    logits(m, images(2))
    hook.remove()
    # the backbone sees 2 slots x (CLS + 16 / 2 tokens): about one image's sequence, for two images
    assert seqs == [torch.Size([1, 2 * (1 + (SIZE // PATCH) ** 2 // 2), D])]


def test_mux_path_validation_and_selection() -> None:
    dm = tiny_vit()
    assert ExecConfig(mux=2).to_json() == '{"mux": 2}' and ExecConfig.from_json('{"mux": 2}') == ExecConfig(mux=2)
    assert ExecConfig().to_json() == "{}"
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="mux="):
            ExecConfig(mux=bad)
    with pytest.raises(ConfigError, match="mux=2 needs a multiplexed model"):
        dm.configure(mux=2)
    with pytest.raises(ConfigError, match="mux=2 needs a multiplexed model"):
        resolve(ExecConfig(mux=2), dm.space)
    x = images(5)
    single = logits(dm, x)
    cp2, cp4 = build(dm, "concatplexer", 2).eval(), build(dm, "concatplexer", 4).eval()
    dm.add_multiplexer(cp2)
    with pytest.raises(ConfigError, match="mux=4 is larger than any attached multiplexed model was trained for"):
        dm.configure(mux=4)
    with pytest.raises(ConfigError, match="mux=4 is larger than the 2 images per pass"):
        resolve(ExecConfig(mux=4), cp2.space)
    with pytest.raises(ConfigError, match="cannot be combined with mlp_width"):
        dm.configure(mux=2, mlp_width=0.5)
    with pytest.raises(ConfigError, match="variant"):
        dm.configure(mux=2, variant="other")
    assert dm.exec_config == ExecConfig()  # a rejected config changes nothing
    assert torch.equal(logits(dm.configure(mux=2), x), logits(cp2, x))
    assert torch.equal(logits(dm.configure(ExecConfig()), x), single)  # mux=1 is the ordinary model
    dm.add_multiplexer(cp4)
    # mux=3 runs on the N=4 model with 3 images per pass and one blank slot
    got = logits(dm.configure(mux=3), x[:3])
    assert torch.allclose(got, logits(cp4, torch.cat([x[:3], torch.zeros(1, 3, SIZE, SIZE)]))[:3], atol=1e-5)
    assert dm.module is cp4 and dm.space.max_mux == 4
    with pytest.raises(ConfigError, match="predicts 3 labels"):
        dm.add_multiplexer(build(_vit_with_labels(3), "concatplexer", 2))


def _vit_with_labels(n: int):
    from transformers import ViTConfig

    from dynavit.model import from_config

    cfg = ViTConfig(image_size=SIZE, patch_size=PATCH, hidden_size=D, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=2 * D, num_labels=n)
    return from_config(cfg)


def test_bad_input() -> None:
    m = build(tiny_vit(), "concatplexer", 2).eval()
    with pytest.raises(DynavitError, match="share one size, got 16x16, 32x32"):
        m([images(1)[0], torch.zeros(3, 32, 32)])
    assert logits(m, list(images(3))).shape == (3, LABELS)  # a list of same-size images is a batch
    with pytest.raises(ConfigError, match="mux=1 must be an integer >= 2"):
        build(tiny_vit(), "concatplexer", 1)
    with pytest.raises(ConfigError, match="patchifier_depth=3"):
        build(tiny_vit(), "imagemux", 2, 3)
    with pytest.raises(ConfigError, match="arch='mimo'"):
        build(tiny_vit(), "mimo", 2)
    with pytest.raises(ConfigError, match="keys='binary'"):
        build(tiny_vit(), "imagemux", 2, keys="binary")
    with pytest.raises(DynavitError, match="not a multiple of mux=2"):
        train_multiplex(m, tiny_vit(), Shapes(), "/nonexistent", Recipe(steps=1, batch_size=3, crop=(SIZE, SIZE)))


def test_profiler_sees_every_operation() -> None:
    """Per-class MACs of the extra operators match their analytic counts exactly."""
    vit = tiny_vit()
    tokens = (SIZE // PATCH) ** 2

    def macs(model, n):
        out: dict[str, int] = {}
        for rec in count(model, lambda: model(images(n)), track_memory=False).records:
            for c in rec.costs:
                out[c.cls] = out.get(c.cls, 0) + c.macs
        return out

    single = macs(vit.module, 1)
    cp = macs(build(vit, "concatplexer", 2).eval(), 2)
    # conv: 2 patch embeddings + the 2x1 reduction conv on 8 output tokens per image
    assert cp["conv"] == 2 * single["conv"] + 2 * (tokens // 2) * D * D * 2
    gauss = macs(build(vit, "imagemux", 2).eval(), 2)
    ortho = macs(build(vit, "imagemux", 2, keys="ortho").eval(), 2)
    # orthogonal binding: one d x d matmul per slot and token (CLS included), counted as a weight matmul
    assert ortho["linear"] - gauss["linear"] == 2 * (tokens + 1) * D * D
    assert ortho["attention"] == gauss["attention"]
    # two images share the backbone: the MACs per image are well below the single-image model's
    assert sum(cp.values()) / 2 < 0.75 * sum(single.values())


def test_save_load_roundtrip(tmp_path) -> None:
    dm = tiny_vit()
    m = build(dm, "imagemux", 2, keys="ortho").eval()
    with torch.no_grad():
        m.keys.mul_(-1)  # a change that only the saved weights carry
    save_multiplexer(m, tmp_path / "mux", {"note": "test"})
    back = load_multiplexer(tmp_path / "mux", dm)
    assert back.spec() == m.spec() and torch.equal(logits(back, images(4)), logits(m, images(4)))
    assert "note" in (tmp_path / "mux" / "README.md").read_text()
    with pytest.raises(DynavitError, match="does not fit this base model"):
        load_multiplexer(tmp_path / "mux", tiny_vit(dim=48))
    with pytest.raises(DynavitError, match="not a multiplexed model folder"):
        load_multiplexer(tmp_path, dm)
    dm.add_multiplexer(tmp_path / "mux")
    assert torch.equal(logits(dm.configure(mux=2), images(4)), logits(m, images(4)))


def test_slot_shuffle_permutes_within_groups() -> None:
    perm = slot_shuffle(8, 4)
    assert sorted(perm[:4].tolist()) == [0, 1, 2, 3] and sorted(perm[4:].tolist()) == [4, 5, 6, 7]


def test_training_distils_and_resumes_exactly(tmp_path) -> None:
    teacher = tiny_vit(seed=1)
    recipe = Recipe(steps=6, batch_size=4, lr=2e-3, warmup=2, crop=(SIZE, SIZE), seed=3, checkpoint_every=3)
    d = Distill(temperature=2.0, use_labels=True)
    whole = train_multiplex(build(tiny_vit(), "concatplexer", 2), teacher, Shapes(), tmp_path / "a", recipe, d,
                            progress=False)
    assert len(whole.losses) == 6 and all(np.isfinite(whole.losses))
    first = train_multiplex(build(tiny_vit(), "concatplexer", 2), teacher, Shapes(), tmp_path / "b", recipe, d,
                            progress=False, stop_after=3)
    rest = train_multiplex(build(tiny_vit(), "concatplexer", 2), teacher, Shapes(), tmp_path / "b", recipe, d,
                           progress=False)
    assert first.losses == whole.losses[:3] and rest.resumed_from == 3 and rest.losses == whole.losses[3:]
    with pytest.raises(DynavitError, match="another run"):
        train_multiplex(build(tiny_vit(), "concatplexer", 2), teacher, Shapes(), tmp_path / "b", recipe,
                        Distill(use_labels=False), progress=False)
    # without labels the student learns the teacher: the distillation loss falls
    long = Recipe(steps=40, batch_size=8, lr=3e-3, warmup=4, crop=(SIZE, SIZE), seed=0, checkpoint_every=100)
    res = train_multiplex(build(tiny_vit(), "imagemux", 2), teacher, Shapes(), tmp_path / "c", long,
                          Distill(use_labels=False), progress=False)
    assert np.mean(res.losses[-5:]) < 0.7 * np.mean(res.losses[:5])


def test_sweep_measures_a_mux_path() -> None:
    from dynavit.sweep.engine import CachedData, Evaluator

    dm = tiny_vit()
    cp = build(dm, "concatplexer", 2).eval()
    dm.add_multiplexer(cp)
    x, y = images(9), torch.arange(9) % LABELS
    data = CachedData([x[:8], x[8:]], [y[:8], y[8:]], "classification", LABELS, -1, [], {})
    ev = Evaluator(dm, data, latency_repeats=3, throughput_repeats=3, n_boot=50)
    base, mux = ev.measure(ExecConfig()), ev.measure(ExecConfig(mux=2))
    expected = logits(cp, x).argmax(-1) == y
    assert mux.per_image[:, 0].tolist() == expected.tolist()
    pass_macs = sum(c.macs for r in count(cp, lambda: cp(x[:2]), track_memory=False).records for c in r.costs)
    assert mux.macs == pytest.approx(pass_macs / 2) and mux.macs < base.macs
    assert mux.latency_p50_ms > 0 and mux.images_per_s > 0 and mux.batch == 8


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 255, (SIZE + 8, SIZE + 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_server_sends_a_burst_through_multiplexed_passes() -> None:
    """Each client gets its own image's answer from a shared pass.

    A multiplexed output depends on the slot partners, so the check is: for every response there
    is exactly one (partner, slot) arrangement of the burst's images (a blank partner included)
    whose output for this client's image, in its slot, equals the response. A server that
    answered with a partner's output, or with the image run alone, fails it.
    """
    require("fastapi")
    import httpx

    from dynavit.runtime import Controller, Entry
    from dynavit.serve.app import create_app, decode_image

    dm = tiny_vit()
    cp = build(dm, "concatplexer", 2).eval()
    with torch.no_grad():  # larger weights: outputs far apart, so a wrong answer cannot pass for a right one
        cp.vit.head.weight.mul_(30)
    dm.add_multiplexer(cp)
    menu = [Entry(ExecConfig(mux=2), 0.7, latency_p95_ms=1.0, gmacs=0.01, label="mux=2"),
            Entry(ExecConfig(), 0.8, latency_p95_ms=2.0, gmacs=0.02, label="default")]
    app = create_app(dm, Controller(menu, model=dm), max_batch=8, max_wait_ms=300, topk=LABELS)
    k = 6
    bodies = [_jpeg(i) for i in range(k)]

    async def go() -> list[dict]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                rs = await asyncio.gather(*[c.post("/v1/infer?config=mux=2", content=b,
                                                   headers={"content-type": "image/png"}) for b in bodies])
        return [r.json() for r in rs]

    answers = asyncio.run(go())
    assert all(a["config"]["exec_config"] == {"mux": 2} for a in answers)
    assert max(a["batch_size"] for a in answers) >= 2  # requests shared passes
    pixels = [dm.transform(decode_image(b, 10**6)) for b in bodies]
    blank = torch.zeros_like(pixels[0])

    def probs(a: dict) -> torch.Tensor:
        p = torch.zeros(LABELS)
        for t in a["topk"]:
            p[t["index"]] = t["probability"]
        return p

    for j, a in enumerate(answers):
        got = probs(a)
        matches, closest_wrong = 0, math.inf
        for partner in [*(pixels[i] for i in range(k) if i != j), blank]:
            for slot in (0, 1):
                pair = [pixels[j], partner] if slot == 0 else [partner, pixels[j]]
                with torch.no_grad():  # the slot-ordered core, not forward(): grouping is under test too
                    both = cp.multiplexed(torch.stack(pair)).softmax(-1)
                want = both[slot]
                err = float((want - got).abs().max())
                if err < 1e-4:
                    matches += 1
                else:
                    closest_wrong = min(closest_wrong, err)
                other = both[1 - slot]  # the partner's answer
                closest_wrong = min(closest_wrong, float((other - got).abs().max()) if partner is not blank
                                    else math.inf)
        assert matches == 1, f"request {j}: {matches} arrangements match its answer"
        assert closest_wrong > 1e-2  # the check can tell a wrong answer from a right one


def test_train_command_multiplex(tmp_path) -> None:
    from typer.testing import CliRunner

    from dynavit.cli import app
    from dynavit.model import load
    from dynavit.train.supervised import export

    export(tiny_vit(), tmp_path / "vit", {"name": "tiny"})
    data = Shapes(10)
    for i in range(len(data)):
        img, y = data.load(i)
        (tmp_path / "data" / f"c{y}").mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "data" / f"c{y}" / f"{i}.png")
    base = ["train", str(tmp_path / "vit"), "--data", str(tmp_path / "data"), "--mode", "multiplex"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "run"), "--mux", "2", "--steps", "2", "--batch-size",
                              "4", "--eval-data", str(tmp_path / "data"), "--no-labels"])
    assert res.exit_code == 0, res.output
    assert "held-out top1" in res.output and "mux=2" in res.output
    dm = load(tmp_path / "vit")
    dm.add_multiplexer(tmp_path / "run" / "model")
    assert logits(dm.configure(mux=2), images(3)).shape == (3, LABELS)
    # the sweep command measures the mux path beside the single-image ones; the server loads the same models
    (tmp_path / "space.json").write_text('{"mux": [1, 2], "mlp_width": [1.0, 0.5]}')
    store = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", str(tmp_path / "vit"), "--data", str(tmp_path / "data"), "--store", str(store),
                              "--space", str(tmp_path / "space.json"), "--strategy", "grid", "--latency-repeats", "2",
                              "--multiplexer", str(tmp_path / "run" / "model")])
    assert res.exit_code == 0, res.output
    from dynavit.serve import load_for_store
    from dynavit.sweep.store import ResultStore

    with ResultStore(store, readonly=True) as rs:
        rows = {r.config: r for r in rs.rows()}
        assert " mux2:" in rs.meta["model_fingerprint"]
    # the multiplexed model has no width knob: that combination is counted invalid, not measured
    assert set(rows) == {ExecConfig(), ExecConfig(mux=2), ExecConfig(mlp_width=0.5)}
    assert rows[ExecConfig(mux=2)].macs < 0.8 * rows[ExecConfig()].macs  # 3 blocks, 1 per image: 0.74x
    served, ctrl = load_for_store(None, store)
    assert 2 in served.multiplexers and ctrl.entries
    assert logits(served.configure(mux=2), images(4)).shape == (4, LABELS)
    for extra, message in ((["--batch-size", "3"], "not a multiple of mux=2"), (["--mux", "1"], "mux=1"),
                           (["--arch", "mimo"], "arch='mimo'")):
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--steps", "1", *extra])
        assert res.exit_code == 2 and message in res.stderr, res.output


def test_fashion_loader_reads_idx_and_explains_a_missing_install(tmp_path, monkeypatch) -> None:
    import gzip

    from dynavit.data import fashion

    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path))
    with pytest.raises(DynavitError, match="apt-get install dataset-fashion-mnist"):
        fashion.FashionMNIST("train")
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 255, (6, 28, 28), dtype=np.uint8), "test": rng.integers(0, 255, (4, 28, 28),
                                                                                             dtype=np.uint8)}
    for split, (img_file, lab_file) in fashion._FILES.items():
        n = len(imgs[split])
        with gzip.open(tmp_path / img_file, "wb") as f:
            f.write(b"\0\0\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + imgs[split].tobytes())
        with gzip.open(tmp_path / lab_file, "wb") as f:
            f.write(b"\0\0\x08\x01" + n.to_bytes(4, "big") + bytes(range(n)))
    ds = fashion.FashionMNIST("test")
    img, label = ds.load(3)
    assert len(ds) == 4 and label == 3 and img.size == (32, 32) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img)[2:30, 2:30, 0], imgs["test"][3]) and np.asarray(img)[0].max() == 0
    x, y = ds.subset([1, 2]).tensors()
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 2]
    with gzip.open(tmp_path / fashion._FILES["test"][1], "wb") as f:
        f.write(b"\0\0\x08\x01" + (9).to_bytes(4, "big") + b"\0")
    with pytest.raises(DynavitError, match="truncated"):
        fashion.FashionMNIST("test")
