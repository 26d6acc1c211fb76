"""``make demo``: the end-to-end tour, written to ``out/``.

1. Profile DeiT-tiny (real weights) at 224x224: where the FLOPs and the time go.
2. Profile a SegFormer-B2 configuration at 512x512 (the dynamic-inference study's model).
3. Evaluate DeiT-tiny on the ImageNet sample photographs with the DeiT protocol.

Offline it uses ``../shared/assets`` (or ``$DYNAVIT_ASSETS``); on an online machine without
them, DeiT-tiny comes from the hub (``facebook/deit-tiny-patch16-224``) and step 3 runs
only when ``--data`` (or the assets) provide labelled images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from dynavit.assets import assets_dir, deit_tiny_source


def _save_profile(p, out: Path, stem: str, console: Console) -> dict:
    rec = Console(record=True, width=110, file=io.StringIO())
    rec.print(p.table())
    rec.print(p.module_table(max_depth=2, top=15))
    (out / f"{stem}_profile.txt").write_text(rec.export_text())
    p.save_json(out / f"{stem}_profile.json")
    p.plot(out / f"{stem}_flops_vs_time.png")
    console.print(p.table())
    return {
        "model": p.model, "input": list(p.input_shape), "gmacs": round(p.total_macs / 1e9, 4),
        "latency_ms_p50": round(p.latency_ms, 2),
        "classes": {k: {"mac_share": round(c.share, 4), "flop_share": round(c.flop_share, 4),
                        "time_share": round(c.time_share, 4)}
                    for k, c in p.classes.items() if c.flops or c.time_ms},
    }


def run_demo(out: Path, *, limit: int | None = None, console: Console | None = None,
             data: Path | None = None) -> dict:
    from dynavit.cost import profile
    from dynavit.data import open_dataset
    from dynavit.evaluation import evaluate
    from dynavit.models import load

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}

    src = deit_tiny_source()
    console.rule(f"1/3 profile DeiT-tiny ({src})")
    deit = load(src)
    summary["deit_tiny"] = _save_profile(profile(deit), out, "deit_tiny", console)

    console.rule("2/3 profile SegFormer-B2 configuration at 512x512 (ADE20K head, 150 classes)")
    seg = load("config:segformer-b2")
    summary["segformer_b2"] = _save_profile(profile(seg, input_size=(512, 512), repeats=3), out,
                                            "segformer_b2", console)

    root = assets_dir()
    data = data or (root / "imagenet-samples" if root else None)
    console.rule(f"3/3 evaluate DeiT-tiny on {data or '(no labelled images found)'}")
    if data is None:
        console.print("skipped: no dataset. Set DYNAVIT_ASSETS or run `dynavit eval MODEL --data DIR`.")
    else:
        res = evaluate(deit, open_dataset(data), limit=limit, progress=True)
        summary["deit_tiny_eval"] = {**res.to_json(), "data": str(data)}
        (out / "deit_tiny_eval.json").write_text(json.dumps(summary["deit_tiny_eval"], indent=2))
        for k in ("top1", "top5"):
            m = res.metrics[k]
            ci = f"95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f}"
            console.print(f"{k}: {m['value']:.4f} ({ci}) on {res.n_images} images")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold]wrote[/] {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/")
    return summary
