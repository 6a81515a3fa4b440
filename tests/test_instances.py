"""Instances: targets from instance maps, decoding them back into cells, and the instance metrics."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from bloodcells.classes import NUM_CLASSES, index_of
from bloodcells.composer.dataset import compose, sprite_pools
from bloodcells.composer.recipe import load_recipe
from bloodcells.formats import scene_paths
from bloodcells.segmenter.instance_metrics import InstanceScorer
from bloodcells.segmenter.instances import (borders, components, decode, distance_target, instance_target,
                                            merge_pieces, rbc_summary)

RBC = index_of("healthy_rbc")


def two_touching_discs(r: int = 12, gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label and instance maps of two RBC discs side by side (touching when gap = 0) and a lymphocyte."""
    inst = np.zeros((64, 96), np.int32)
    cv2.circle(inst, (30, 32), r, 1, -1)
    right = np.zeros_like(inst)
    cv2.circle(right, (30 + 2 * r + gap, 32), r, 1, -1)
    inst[right > 0] = 2
    cv2.circle(inst, (84, 12), 8, 3, -1)
    label = np.where(inst > 0, RBC, 0).astype(np.uint8)
    label[inst == 3] = index_of("lymphocyte")
    return label, inst


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    r = load_recipe("tiny", {"scenes": {"train": 0, "val": 0, "test": 16}})
    pools, info = sprite_pools(None, r)
    out = tmp_path_factory.mktemp("inst") / "d"
    compose(r, pools, out, info, workers=1, progress=False)
    ds = json.loads((out / "dataset.json").read_text())
    px, n = ds["class_pixels"]["test"], ds["object_counts"]["test"]
    # prediction drops objects below 15% of a class's mean visible cell area (segmenter/count.py MIN_FRACTION)
    specks = {c: 0.15 * px[c] / n[c] for c in range(1, NUM_CLASSES) if n[c]}
    items = []
    for i in range(16):
        p = scene_paths(out, "test", f"{i:06d}")
        inst = cv2.imread(str(p.instances), cv2.IMREAD_UNCHANGED).astype(np.int32)
        label = cv2.imread(str(p.label), cv2.IMREAD_UNCHANGED)
        ann = json.loads(p.annotation.read_text())
        items.append((label, inst, np.array([index_of(o["class"]) for o in ann["objects"]])))
    return items, specks


def one_hot(label: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[label].transpose(2, 0, 1).copy()


def test_targets_mark_where_touching_cells_meet():
    label, inst = two_touching_discs()
    b = borders(inst)
    assert b[32, 30 + 11] and b[32, 30 + 12] and not b[32, 30]  # both sides of the contact line; not the middle
    d = distance_target(inst)
    assert d[inst == 0].max() == 0 and d.max() == pytest.approx(1.0)
    for k in (1, 2, 3):
        assert d[inst == k].max() == pytest.approx(1.0)  # normalised per cell
    assert d[32, 30] > 0.9 and d[32, 41] < 0.15  # high in the middle, a valley where the cells touch
    assert np.array_equal(instance_target(inst, "boundary"), b.astype(np.float32))


@pytest.mark.parametrize("mode", ["distance", "boundary"])
def test_decoding_perfect_outputs_gives_back_the_cells(scenes, mode):
    """With the true class map and the true instance target, decoding finds the composed cells again: touching
    RBCs come apart, and nearly every cell is matched at IoU > 0.5."""
    items, specks = scenes
    scorer = InstanceScorer(min_area=specks)
    for label, inst, classes in items:
        cells = decode(one_hot(label), instance_target(inst, mode), mode, specks)
        assert cells.instances.max() == len(cells)
        scorer.add(inst, classes, cells.instances, cells.classes, cells.confidence)
    r = scorer.result()
    assert r["per_class_pq"][RBC] > 0.95 and r["per_class_count_mae"][RBC] < 0.5, r
    assert r["ap50"] > 0.95
    # the class-region rule merges touching RBCs: far fewer objects than cells
    merged = InstanceScorer(min_area=specks)
    for label, inst, classes in items:
        c = components(label, specks)
        merged.add(inst, classes, c.instances, c.classes, c.confidence)
    assert merged.result()["per_class_pq"][RBC] < r["per_class_pq"][RBC] - 0.3


def test_decoding_keeps_groups_apart_and_drops_specks():
    label, inst = two_touching_discs()
    label[inst == 2] = index_of("neutrophil")  # the right disc is a WBC: the class map separates it anyway
    aux = distance_target(inst)
    cells = decode(one_hot(label), aux, "distance", min_area={c: 100.0 for c in range(1, NUM_CLASSES)})
    assert sorted(cells.classes.tolist()) == sorted([index_of("neutrophil"), RBC, index_of("lymphocyte")])
    big = decode(one_hot(label), aux, "distance", min_area={c: 250.0 for c in range(1, NUM_CLASSES)})
    assert sorted(big.classes.tolist()) == sorted([index_of("neutrophil"), RBC])  # the 8 px lymphocyte: a speck
    assert (big.instances[inst == 3] == 0).all()
    k = int(np.flatnonzero(cells.classes == RBC)[0]) + 1
    x0, y0, x1, y1 = cells.boxes[k - 1]
    assert (x0, y0, x1, y1) == (18, 20, 42, 45) and cells.areas[k - 1] == (inst == 1).sum()
    assert cells.centres[k - 1] == pytest.approx((30.0, 32.0), abs=0.05)


def test_metrics_score_a_perfect_and_a_merged_prediction():
    label, inst = two_touching_discs(gap=1)  # two equal discs
    classes = np.array([RBC, RBC, index_of("lymphocyte")])
    s = InstanceScorer()
    s.add(inst, classes, inst, classes, np.ones(3))
    r = s.result()
    assert r["per_class_pq"][RBC] == pytest.approx(1.0) and r["ap"] == pytest.approx(1.0)
    assert r["ap50"] == pytest.approx(1.0) and r["per_class_count_mae"][RBC] == 0
    merged = np.select([inst == 3, inst > 0], [2, 1], 0)  # the two RBCs as one object, then the lymphocyte
    s2 = InstanceScorer()
    s2.add(inst, classes, merged, np.array([RBC, index_of("lymphocyte")]), np.ones(2))
    r2 = s2.result()
    # object 1 covers both discs (IoU 0.5 with each: not a match); the lymphocyte is right
    assert r2["tp"][RBC] == 0 and r2["fn"][RBC] == 2 and r2["fp"][RBC] == 1 and r2["per_class_pq"][RBC] == 0
    assert r2["per_class_pq"][index_of("lymphocyte")] == pytest.approx(1.0)
    assert r2["per_class_count_mae"][RBC] == 1 and r2["per_class_count_bias"][RBC] == -1
    assert r2["per_group_count_mae"] == {"rbc": 1, "wbc": 0, "platelet": 0}


def test_specks_of_the_truth_are_neither_missed_nor_counted():
    label, inst = two_touching_discs()
    classes = np.array([RBC, RBC, index_of("lymphocyte")])
    s = InstanceScorer(min_area={index_of("lymphocyte"): 500.0})  # the lymphocyte (201 px) is below it
    only_rbc = np.where(inst == 3, 0, inst)
    s.add(inst, classes, only_rbc, classes[:2], np.ones(2))
    r = s.result()
    assert r["fn"][index_of("lymphocyte")] == 0 and r["per_class_count_mae"][index_of("lymphocyte")] == 0
    assert r["per_class_pq"][index_of("lymphocyte")] is None


def test_rbc_summary_gives_parasitaemia():
    assert rbc_summary({"infected_rbc": 3, "healthy_rbc": 97}) == {"rbc_total": 100, "parasitemia_pct": 3.0}
    assert rbc_summary({"infected_rbc": 0, "healthy_rbc": 0}) == {"rbc_total": 0, "parasitemia_pct": None}


def test_flooding_part_by_part_equals_one_watershed_over_the_mask(scenes):
    """The shortcut (one-seed parts as they are, the others flooded in their own box) gives the same objects as a
    watershed over the whole mask, up to their numbering."""
    from skimage.segmentation import watershed

    from bloodcells.segmenter.instances import flood

    items, _ = scenes
    rng = np.random.default_rng(0)
    for label, inst, _ in items[:6]:
        aux = distance_target(inst) + rng.normal(0, 0.05, inst.shape).astype(np.float32)  # noisy, several maxima
        mask, seeds = label > 0, aux > 0.5
        ours, n = flood(mask, seeds, -aux)
        _, markers = cv2.connectedComponents((seeds & mask).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        ref = watershed(-aux, markers, mask=mask)
        rest = mask & (ref == 0)
        _, extra = cv2.connectedComponents(rest.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        ref = np.where(rest, extra + ref.max() * (extra > 0), ref)
        assert n == len(np.unique(ref[ref > 0])) and ((ours > 0) == mask).all()
        pairs = np.unique(np.stack([ours[mask], ref[mask]]), axis=1)  # a one-to-one relabelling
        assert len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


def test_pieces_of_one_cell_are_joined_and_touching_cells_are_not():
    """merge_pieces: a cell the watershed cut in two (or a sliver shed by it) becomes one object; two whole
    touching cells, an L of two pieces (not cell-shaped), and cells of different groups stay apart."""
    r = 12
    area = {c: np.pi * r * r for c in range(1, NUM_CLASSES)}
    disc = np.zeros((64, 96), np.int32)
    cv2.circle(disc, (30, 32), r, 1, -1)
    cut = disc.copy()
    cut[:, 27:] *= 2  # one disc cut into a sliver (left) and the rest
    label = np.where(cut > 0, RBC, 0).astype(np.uint8)
    joined = merge_pieces(cut, label, area)
    assert len(np.unique(joined[joined > 0])) == 1 and ((joined > 0) == (disc > 0)).all()
    label2, two = two_touching_discs(r)
    assert len(np.unique(merge_pieces(two, label2, area))) == 4  # background and three cells: nothing joined
    over = np.zeros((64, 96), np.int32)
    cv2.circle(over, (30, 32), r, 1, -1)
    right = np.zeros_like(over)
    cv2.circle(right, (44, 32), r, 1, -1)
    over[right > 0] = 2  # two overlapping cells: their union is convex, but 1.66 cells big
    assert len(np.unique(merge_pieces(over, np.where(over > 0, RBC, 0).astype(np.uint8), area))) == 3
    ell = np.zeros((64, 96), np.int32)
    ell[10:40, 10:16] = 1
    ell[34:40, 16:40] = 2  # together 324 px, within 1.4 cells, but an L: far from convex
    assert len(np.unique(merge_pieces(ell, np.where(ell > 0, RBC, 0).astype(np.uint8), area))) == 3
    mixed = label.copy()
    mixed[cut == 2] = index_of("neutrophil")
    assert len(np.unique(merge_pieces(cut, mixed, area))) == 3  # an RBC sliver never joins a white cell
    # decode joins them only when given the expected cell areas
    aux = np.where(disc > 0, 1.0, 0.0).astype(np.float32)
    aux[:, 26:29] = 0.2  # a valley across the cell: the watershed cuts it in two
    assert len(decode(one_hot(label), aux, "distance")) == 2
    assert len(decode(one_hot(label), aux, "distance", cell_area=area)) == 1
    assert len(decode(one_hot(label), aux, "distance", cell_area=area, merge_area=0.5)) == 2  # a tighter limit


def test_a_whole_red_cell_keeps_its_neighbour_and_a_border_stops_a_join():
    """merge_pieces joins pieces of one cell, not two red cells: never a piece to an object already MERGE_WHOLE of a
    cell (a whole cell beside a sliver the image edge cut), nor across a contact where the map falls under
    MERGE_PASS (a border). White cells lie apart and keep the plain rule."""
    r = 12
    area = {c: float(np.pi * r * r) for c in range(1, NUM_CLASSES)}
    inst = np.zeros((40, 60), np.int32)
    cv2.circle(inst, (r + 1, 20), r, 1, -1)
    inst[8:33, 2 * r + 2:2 * r + 6] = 2  # a 4-px sliver of the next cell, cut by the right edge of a narrow field
    inst = inst[:, :2 * r + 6]
    label = np.where(inst > 0, RBC, 0).astype(np.uint8)
    assert (inst == 2).sum() < 0.25 * area[RBC]
    aux = distance_target(inst)
    assert len(np.unique(merge_pieces(inst, label, area, whole=0.0))) == 2  # the plain rule takes them as one
    assert len(np.unique(merge_pieces(inst, label, area, whole=0.8))) == 3
    wbc = np.where(inst > 0, index_of("neutrophil"), 0).astype(np.uint8)
    assert len(np.unique(merge_pieces(inst, wbc, area, whole=0.8))) == 2  # red cells only
    # two halves of one cell: joined where the map stays up between them, not where it falls to a border
    disc = np.zeros((64, 96), np.int32)
    cv2.circle(disc, (30, 32), r, 1, -1)
    cut = disc.copy()
    cut[:, 30:] *= 2
    label = np.where(cut > 0, RBC, 0).astype(np.uint8)
    up = np.where(disc > 0, 0.6, 0.0).astype(np.float32)
    low = up.copy()
    low[:, 29:31] = 0.05
    assert len(np.unique(merge_pieces(cut, label, area, height=up, least_pass=0.2))) == 2
    assert len(np.unique(merge_pieces(cut, label, area, height=low, least_pass=0.2))) == 3
    assert len(np.unique(merge_pieces(cut, label, area, height=low, least_pass=0.0))) == 2
    # decode applies both by default (MERGE_WHOLE, MERGE_PASS)
    assert len(decode(one_hot(label), low, "distance", cell_area=area)) == 2
    assert len(decode(one_hot(label), low, "distance", cell_area=area, least_pass=0.0)) == 1


def test_unsure_platelets_are_dropped_and_sure_ones_kept():
    """min_confidence: an object whose mean top probability is under its class's limit is dropped (predict and
    evaluate drop platelets under 0.8 by default); other classes and sure platelets stay."""
    from bloodcells.segmenter.instances import MIN_CONFIDENCE

    plt = index_of("thrombocyte")
    label = np.zeros((48, 64), np.uint8)
    cv2.circle(label, (12, 24), 5, plt, -1)  # a sure platelet
    cv2.circle(label, (32, 24), 5, plt, -1)  # an unsure one (a faint patch of plasma)
    cv2.circle(label, (52, 24), 6, RBC, -1)  # an unsure red cell: not a platelet, kept
    probs = one_hot(label) * 0.95 + 0.05 / NUM_CLASSES
    for x in (32, 52):
        m = np.zeros_like(label, bool)
        cv2.circle(m.view(np.uint8), (x, 24), 6, 1, -1)
        probs[:, m] = 0.05 / NUM_CLASSES
        probs[label[m][0] if x == 52 else plt, m] = 0.6
        probs[0, m] += 0.4 - 0.05 / NUM_CLASSES
    aux = distance_target(np.where(label > 0, cv2.connectedComponents((label > 0).astype(np.uint8))[1], 0))
    assert MIN_CONFIDENCE[plt] == 0.8 and RBC not in MIN_CONFIDENCE
    kept = decode(probs, aux, "distance")
    assert len(kept) == 3
    sure = decode(probs, aux, "distance", min_confidence=MIN_CONFIDENCE)
    assert sorted(sure.classes.tolist()) == sorted([plt, RBC])
    assert sure.centres[sure.classes == plt][0] == pytest.approx((12.0, 24.0), abs=0.5)
    assert len(components(label, probs=probs, min_confidence=MIN_CONFIDENCE)) == 2


def test_red_cells_are_called_infected_only_when_the_model_is_sure():
    """infected: a red cell whose pixels are mostly infected is still called healthy unless the infected class holds
    at least that share of its red-cell probability (predict and evaluate use SURE_INFECTED, 0.6); 0: by majority."""
    from bloodcells.segmenter.instances import SURE_INFECTED, find_cells

    inf = index_of("infected_rbc")
    label = np.zeros((48, 96), np.uint8)
    shares = (0.95, 0.55, 0.3)  # sure, unsure (still the majority), healthy
    probs = np.full((NUM_CLASSES, 48, 96), 0.02 / (NUM_CLASSES - 2), np.float32)
    probs[0] = 0.0
    for k, share in enumerate(shares):
        m = np.zeros_like(label)
        cv2.circle(m, (16 + 32 * k, 24), 12, 1, -1)
        label[m > 0] = inf if share > 0.5 else RBC
        probs[inf][m > 0], probs[RBC][m > 0] = 0.98 * share, 0.98 * (1 - share)
    probs[0][label == 0] = 1.0
    probs[1:, label == 0] = 0.0
    aux = distance_target(cv2.connectedComponents((label > 0).astype(np.uint8))[1])
    area = {inf: 450.0, RBC: 450.0}
    assert SURE_INFECTED == 0.6
    by_x = lambda cells: [int(c) for _, c in sorted(zip(cells.centres[:, 0], cells.classes))]  # noqa: E731
    assert by_x(decode(probs, aux, "distance")) == [inf, inf, RBC]  # by majority
    assert by_x(decode(probs, aux, "distance", infected=0.8)) == [inf, RBC, RBC]
    assert by_x(decode(probs, aux, "distance", infected=0.99)) == [RBC, RBC, RBC]
    cells, _ = find_cells(probs, aux, "distance", {}, area)  # what predict and evaluate do by default
    assert by_x(cells) == [inf, RBC, RBC]
    assert by_x(find_cells(probs, aux, "distance", {}, area, infected=0)[0]) == [inf, inf, RBC]
    assert by_x(components(label, probs=probs, infected=0.6)) == [inf, RBC, RBC]
    assert by_x(decode(probs, aux, "distance", infected=0.5)) == [inf, inf, RBC]


def test_a_seed_without_a_high_enough_peak_does_not_split_a_cell():
    """SEED_H: a cell whose predicted distance map has a second, shallow core above the seed threshold (a bump
    0.17 above the pass to the main peak) is one cell, while two touching cells, each with its own full peak, stay
    two; with h = 0 every core above the threshold seeds a cell of its own."""
    from bloodcells.segmenter.instances import SEED_H

    label, inst = two_touching_discs()
    aux = distance_target(inst)
    yy, xx = np.mgrid[:64, :96]
    lobed = np.zeros((64, 96), np.int32)
    cv2.ellipse(lobed, (48, 54), (30, 8), 0, 0, 360, 1, -1)  # an elongated cell below the discs
    # along its axis: the main peak 1.0 at x = 35, a pass of 0.45 at x = 52, a second core of 0.62 at x = 60
    profile = np.interp(xx, [18, 35, 52, 60, 78], [0.05, 1.0, 0.45, 0.62, 0.05])
    aux = np.where(lobed > 0, profile * (1 - np.abs(yy - 54) / 9.0), aux).astype(np.float32)
    assert aux[54, 60] > 0.5 and aux[54, 52] < 0.5  # the shallow core lies apart from the main one
    cv2.circle(lobed, (87, 54), 8, 2, -1)  # and a round cell touching its tip, with a full peak of its own
    aux = np.where(lobed == 2, distance_target((lobed == 2).astype(np.int32)), aux).astype(np.float32)
    label = np.where(lobed > 0, RBC, label).astype(np.uint8)
    assert SEED_H["distance"] == 0.2
    cells = decode(one_hot(label), aux, "distance")
    split = decode(one_hot(label), aux, "distance", h=0.0)
    rbc = lambda c: int((c.classes == RBC).sum())
    assert rbc(cells) == 4 and rbc(split) == 5
    assert len(np.unique(cells.instances[lobed == 1])) == 1  # the shallow core's side is flooded from the main one
    # the two touching discs are still told apart (their peaks stand 1.0 above the valley where they meet)
    assert len(np.unique(cells.instances[inst == 1])) == 1 and cells.instances[32, 30] != cells.instances[32, 54]


def test_many_seeds_are_judged_at_once_as_each_on_its_own():
    """A weak model's speckle puts hundreds of seeds in one part; they are judged by one reconstruction instead of
    a pass each. Both ways keep and drop the same seeds, on random maps with ties and several h."""
    from scipy import ndimage

    from bloodcells.segmenter.instances import _drop_shallow

    rng = np.random.default_rng(0)
    dropped = compared = 0
    for trial in range(60):
        f = ndimage.gaussian_filter(rng.random(tuple(rng.integers(20, 90, 2))), rng.uniform(1, 3))
        f = (f - f.min()) / np.ptp(f)
        if trial % 3 == 0:
            f = np.round(f, 2)  # plateaus and equal peaks
        part = f > rng.uniform(0.1, 0.3)
        n, marks = cv2.connectedComponents(((f > rng.uniform(0.4, 0.6)) & part).astype(np.uint8), connectivity=8,
                                           ltype=cv2.CV_32S)
        if n < 3:
            continue
        peak = np.asarray(ndimage.maximum(f, marks, np.arange(1, n)))
        height, h = np.where(part, f, -np.inf), float(rng.choice([0.05, 0.1, 0.2]))
        each = _drop_shallow(marks, height, peak, h, each_max=10**6)
        at_once = _drop_shallow(marks, height, peak, h, each_max=0)
        np.testing.assert_array_equal(at_once, each)
        compared += 1
        dropped += len(np.unique(marks)) - len(np.unique(each))
    assert compared >= 30 and dropped >= 30  # the cases do drop seeds, and keep others
