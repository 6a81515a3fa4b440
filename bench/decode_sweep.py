"""How the decoding of cells from a model's instance map sets the counts: one pass of the model over a composed
split, then the cells decoded at several seed thresholds (and joining limits), each scored against the scenes'
instance maps.

Usage: python bench/decode_sweep.py --model runs/realistic/best.pt --data data/realistic --split val \
    [--seeds 0.3,0.4,0.5,0.6,0.7] [--merge-areas 1.4] [--h-maxima 0.2] [--wholes 0,0.8] [--passes 0,0.2] \
    [--sure-infected 0.5,0.6] [--images 400] [--out sweep.json]

For a checkpoint with the distance output (`cli train --instance distance`). Each setting decodes the same
predictions as `cli evaluate` does (`segmenter.instances.decode`: seeded watershed, pieces of one cell joined,
unsure platelets dropped, red cells called infected only when sure), with only the seed threshold (`SEED`), a
seed's least peak height (`SEED_H`; every setting is also decoded at 0, all seeds), the joining limit
(`MERGE_AREA`) and its two vetoes for red cells (`MERGE_WHOLE`: a piece is never joined to an object already a
whole cell; `MERGE_PASS`: nor across a border where the map falls low) and the least infected share of a red cell
called infected (`SURE_INFECTED`, `--sure-infected`) changed; rows differ by the rule alone, not by a model run.
Prints per setting: the red, white, platelet and infected cells counted per scene (mean absolute error and bias
against the truth) and the panoptic quality of the two red-cell classes, each and taken as one (outlines alone,
whatever the infected call). Choose on val, confirm on test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bloodcells.classes import GROUPS, NAMES  # noqa: E402
from bloodcells.errors import BloodcellsError  # noqa: E402
from bloodcells.formats import read_json, scene_paths  # noqa: E402
from bloodcells.segmenter.checkpoint import load_model  # noqa: E402
from bloodcells.segmenter.count import MIN_FRACTION, resolve_areas  # noqa: E402
from bloodcells.segmenter.data import SegmentationDataset, read_instances  # noqa: E402
from bloodcells.segmenter.instance_metrics import InstanceScorer  # noqa: E402
from bloodcells.segmenter.instances import (MERGE_PASS, MERGE_WHOLE, MIN_CONFIDENCE, SEED_H,  # noqa: E402
                                            SURE_INFECTED, decode)
from bloodcells.segmenter.runtime import make_runtime  # noqa: E402

HEALTHY, INFECTED = NAMES.index("healthy_rbc"), NAMES.index("infected_rbc")


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def panoptic(scorer: InstanceScorer) -> np.ndarray:
    """Panoptic quality per class of what `scorer` holds: summed IoU of the matches over tp + fp / 2 + fn / 2."""
    return scorer.iou_sum / np.maximum(scorer.tp + scorer.fp / 2 + scorer.fn / 2, 1e-12)


def score(truths: list[tuple[np.ndarray, np.ndarray]], cells: list, min_area) -> dict[str, float]:
    """`cli evaluate`'s instance scores (`InstanceScorer`: cells too little visible to count are ignored) and the
    signed count error per group."""
    scorer = InstanceScorer(min_area=min_area)
    red = InstanceScorer(min_area=min_area)  # the two red-cell classes taken as one: outlines, not the infected call
    bias = {g: 0.0 for g in GROUPS}
    for (gt, gt_cls), c in zip(truths, cells):
        scorer.add(gt, gt_cls, c.instances, c.classes, c.confidence)
        red.add(gt, np.where(gt_cls == INFECTED, HEALTHY, gt_cls), c.instances,
                np.where(np.asarray(c.classes) == INFECTED, HEALTHY, c.classes), c.confidence)
        area = np.bincount(gt.ravel(), minlength=len(gt_cls) + 1)[1:len(gt_cls) + 1]
        counted = area >= np.array([min_area.get(int(k), 0.0) for k in gt_cls])
        for g, names in GROUPS.items():
            members = [NAMES.index(n) for n in names]
            bias[g] += int(np.isin(c.classes, members).sum()) - int((np.isin(gt_cls, members) & counted).sum())
    n = max(scorer.scenes, 1)
    pq, pq_red = panoptic(scorer), panoptic(red)[HEALTHY]
    out = {f"{g}_mae": v / n for g, v in scorer.group_err.items()}
    out.update({f"{g}_bias": v / n for g, v in bias.items()})
    out.update(pq_healthy=float(pq[HEALTHY]), pq_infected=float(pq[INFECTED]), pq_red=float(pq_red),
               healthy_mae=float(scorer.count_err[HEALTHY] / n), infected_mae=float(scorer.count_err[INFECTED] / n),
               infected_bias=float(scorer.count_signed[INFECTED] / n))
    return out


def predict_split(model_path: Path, data: Path, split: str, images: int = 0):
    """One pass of a distance-output model over the first `images` scenes of a composed split (0: all):
    ([(class probabilities float16 (C, H, W), distance map (H, W))], [(true instance map, class of each object)],
    expected area per class, least counted area per class)."""
    runtime = make_runtime("auto", "cpu")
    model, meta = load_model(model_path, runtime.device)
    mode = meta["config"].get("instance")
    if mode != "distance":
        sys.exit(f"{model_path}: its instance output is {mode!r}; this is for the distance output")
    model = runtime.model(model).eval()
    ds = SegmentationDataset(data, split, mean=meta["mean"], std=meta["std"], cache=False)
    ids = ds.ids[:images] if images else ds.ids
    areas, _ = resolve_areas(meta, data)
    min_area = {c: MIN_FRACTION * a for c, a in areas.items()}
    k = meta["config"]["num_classes"]
    t0 = time.time()
    preds, truths = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), 8):
            idx = range(start, min(start + 8, len(ids)))
            x = torch.stack([ds[i][0] for i in idx])
            with runtime.autocast():
                out = model(runtime.batch(x)).float()
            probs = torch.softmax(out[:, :k], 1).numpy().astype(np.float16)
            aux = torch.sigmoid(out[:, k]).numpy()
            for j, i in enumerate(idx):
                preds.append((probs[j], aux[j]))
                paths = scene_paths(ds.root, ds.split, ids[i])
                gt_cls = np.array([NAMES.index(o["class"]) for o in read_json(paths.annotation)["objects"]], np.int64)
                truths.append((read_instances(paths.instances).astype(np.int32), gt_cls))
    print(f"{len(ids)} {split} scenes of {data}: predicted in {time.time() - t0:.0f} s", flush=True)
    return preds, truths, areas, min_area


def decode_today(probs: np.ndarray, aux: np.ndarray, areas: dict, min_area: dict, h: float | None = None):
    """The cells of one scene's prediction decoded as `cli evaluate` decodes them today (`h`: another `SEED_H`)."""
    return decode(probs.astype(np.float32), aux, "distance", min_area, cell_area=areas,
                  min_confidence=MIN_CONFIDENCE, infected=SURE_INFECTED, h=h)


def split_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a script that runs a model over a composed split: --model, --data, --split, --images."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=0, help="first N scenes of the split (0: all)")
    return ap


def guarded(run) -> None:
    """run(); a missing or wrong model or dataset ends it with one line naming it."""
    try:
        run()
    except BloodcellsError as e:
        sys.exit(f"error: {e}")


def main() -> None:
    guarded(sweep)


def sweep() -> None:
    ap = split_parser(__doc__)
    ap.add_argument("--seeds", type=floats, default=floats("0.3,0.4,0.5,0.6,0.7"))
    ap.add_argument("--merge-areas", type=floats, default=floats("1.4"))
    ap.add_argument("--h-maxima", type=floats, default=[SEED_H["distance"]],
                    help="also decode with these least peak heights of a seed (SEED_H; default: today's; each row "
                         "also at 0, all seeds)")
    ap.add_argument("--wholes", type=floats, default=None,
                    help="never join a piece to an object already this many cells big (MERGE_WHOLE; 0: off; "
                         "default: today's)")
    ap.add_argument("--passes", type=floats, default=None,
                    help="join two pieces only where the map between them stays this high (MERGE_PASS; 0: off; "
                         "default: today's)")
    ap.add_argument("--sure-infected", type=floats, default=None,
                    help="call a red cell infected when that class holds this share of its red probability "
                         "(SURE_INFECTED; default: today's)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    preds, truths, areas, min_area = predict_split(args.model, args.data, args.split, args.images)
    t1 = time.time()
    rows = []
    print("seed  merge  h    whole pass  inf. | cells per scene, abs. error / bias: RBC      WBC      platelet "
          "infected | PQ healthy / infected / red as one")
    wholes = args.wholes if args.wholes is not None else [MERGE_WHOLE]
    passes = args.passes if args.passes is not None else [MERGE_PASS]
    sure = args.sure_infected if args.sure_infected is not None else [SURE_INFECTED]
    grid = [(s, m, h, w, lp, si) for s in args.seeds for m in args.merge_areas for h in [0.0, *args.h_maxima]
            for w in wholes for lp in passes for si in sure]
    for seed, merge, h, whole, least_pass, sure_infected in grid:
        cells = [decode(probs.astype(np.float32), aux, "distance", min_area, seed=seed, cell_area=areas,
                        min_confidence=MIN_CONFIDENCE, infected=sure_infected, h=h, merge_area=merge,
                        whole=whole, least_pass=least_pass)
                 for probs, aux in preds]
        r = {"seed": seed, "merge_area": merge, "h_maxima": h, "merge_whole": whole, "merge_pass": least_pass,
             "sure_infected": sure_infected,
             **score(truths, cells, min_area)}
        rows.append(r)
        print(f"{seed:.2f}  {merge:.2f}  {h:.2f} {whole:4.2f}  {least_pass:.2f}  {sure_infected:.2f} | "
              f"{r['rbc_mae']:5.2f} / {r['rbc_bias']:+5.2f}  "
              f"{r['wbc_mae']:4.2f} / {r['wbc_bias']:+5.2f}  {r['platelet_mae']:4.2f} / {r['platelet_bias']:+5.2f} "
              f"{r['infected_mae']:4.2f} / {r['infected_bias']:+5.2f} "
              f"| {r['pq_healthy']:.3f} / {r['pq_infected']:.3f} / {r['pq_red']:.3f}", flush=True)
    true_rbc = np.mean([np.isin(c, [HEALTHY, INFECTED]).sum() for _, c in truths])
    print(f"true red cells per scene: {true_rbc:.1f}; decoding took {time.time() - t1:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "split": args.split,
                                        "scenes": len(preds), "true_rbc_per_scene": float(true_rbc), "rows": rows},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
