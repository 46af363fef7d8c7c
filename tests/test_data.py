import math

import pytest
import torch

from fastmeta.data import Omniglot, OmniglotTasks, SinusoidTasks, split_alphabets


def test_sinusoid_ranges_and_reproducibility():
    b = SinusoidTasks(k_shot=10, k_query=7, seed=3).sample(200)
    assert b.support_x.shape == (200, 10, 1) and b.query_x.shape == (200, 7, 1)
    x = torch.cat([b.support_x, b.query_x], 1)
    y = torch.cat([b.support_y, b.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5.0
    # every task is one sinusoid A sin(x - phi), A in [0.1, 5], phi in [0, pi]: fit (a, b) in
    # a sin x + b cos x by least squares and recover A = |(a, b)|, phi = atan2(-b, a)
    X = torch.stack([torch.sin(x), torch.cos(x)], -1).squeeze(2).double()
    coef = torch.linalg.lstsq(X, y.double()).solution.squeeze(-1)
    amp, phase = coef.norm(dim=1), torch.atan2(-coef[:, 1], coef[:, 0])
    assert amp.min() >= 0.1 - 1e-4 and amp.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    again = SinusoidTasks(k_shot=10, k_query=7, seed=3).sample(200)
    assert torch.equal(again.query_y, b.query_y)


def test_omniglot_reads_zips_and_dirs_identically(omniglot_data, omniglot_dir):
    a = omniglot_data
    b = Omniglot(omniglot_dir)
    # Greek and Latin are in both zips: merged by (alphabet, character)
    assert len(a.alphabets) == 8 and a.classes == b.classes
    assert sum(1 for c in a.classes if c[0] == "Greek") == 24
    assert len(a.classes) == 136 + 156 - 24 - 26
    assert all(img.shape == (20, 1, 28, 28) for img in a.images)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    img = a.images[0]
    assert 0 <= img.min() and img.max() <= 1 and img.mean() < 0.5  # strokes are 1 on a 0 background


def test_alphabet_split_is_disjoint_and_seeded(omniglot_data):
    data = omniglot_data
    tr, va, te = split_alphabets(data.alphabets, n_test=2, n_val=1, seed=4)
    assert not (set(tr) & set(te)) and not (set(tr) & set(va)) and not (set(va) & set(te))
    assert sorted(tr + va + te) == data.alphabets
    assert (tr, va, te) == split_alphabets(data.alphabets, n_test=2, n_val=1, seed=4)


def test_nway_kshot_sampler(omniglot_data):
    data = omniglot_data
    tasks = OmniglotTasks(data, ["Korean", "Latin"], ways=5, shots=1, queries=3, rotations=True, seed=1)
    b = tasks.sample(4)
    assert b.support_x.shape == (4, 5, 1, 28, 28) and b.query_x.shape == (4, 15, 1, 28, 28)
    assert b.ways == 5 and torch.equal(b.support_y[0], torch.arange(5))
    # support and query drawings of a class are different drawings of the same character
    for t in range(4):
        for c in range(5):
            s = b.support_x[t, c]
            q = b.query_x[t, b.query_y[t] == c]
            assert not any(torch.equal(s, qi) for qi in q)
    with pytest.raises(ValueError, match="shots"):
        OmniglotTasks(data, ["Latin"], ways=5, shots=10, queries=15)
    with pytest.raises(ValueError, match="alphabets"):
        OmniglotTasks(data, ["Klingon"])


def test_omniglot_bad_root(tmp_path):
    with pytest.raises(ValueError, match="roots"):
        Omniglot(tmp_path)


def test_corrupt_png_in_a_zip_names_the_zip_and_the_member(tmp_path):
    # Was: PIL's UnidentifiedImageError naming no file.
    import io
    import zipfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, "PNG")
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for c in range(2):
            for d in range(2):
                zf.writestr(f"set/Alpha/character0{c}/0{c}_0{d}.png", buf.getvalue())
        zf.writestr("set/Alpha/character01/01_09.png", b"\x89PNG truncated")
    with pytest.raises(ValueError, match=r"roots: cannot read the image member 'set/Alpha/character01/01_09.png' "
                                         r"of zip .*set.zip"):
        Omniglot(z)


# --------------------------------------------------------------------------------------------------
# A synthetic Omniglot-layout tree whose images say which character and drawing they are: the
# character's code sits in the top-left 7x7 block, the drawing's code in the top-right one (values
# from disjoint ranges), the rest is background. A sampled image's corner blocks then tell its
# character, its drawing and its rotation (where the character block ended up).
CORNERS = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}   # where rot90 (counter-clockwise) moves top-left


def _write_coded_tree(root, alphabets=2, characters=3, drawings=6):
    from PIL import Image

    k = 0
    for a in range(alphabets):
        for c in range(characters):
            d = root / f"Alpha{a}" / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            for j in range(drawings):
                ink = torch.zeros(28, 28)
                ink[:7, :7] = (k + 1) / 32                      # character code, < 0.5
                ink[:7, -7:] = 0.5 + (j + 1) / 32               # drawing code, > 0.5
                # PNG stores black strokes on white; the loader inverts (strokes = 1)
                g = ((1 - ink) * 255).round().to(torch.uint8).numpy()
                Image.fromarray(g, mode="L").save(d / f"{k:02d}_{j:02d}.png")
            k += 1
    return k


def _decode(img):
    """(character index, drawing index, rotation k of rot90) from a sampled ``[1, 28, 28]`` image."""
    char = draw = rot = None
    for (r, c), k in CORNERS.items():
        v = float(img[0, 3 + 21 * r, 3 + 21 * c])
        if 0 < v < 0.5:
            char, rot = round(v * 32) - 1, k
        elif v > 0.5:
            draw = round((v - 0.5) * 32) - 1
    assert char is not None and draw is not None, "every image carries both codes"
    return char, draw, rot


@pytest.mark.parametrize("rotations", [False, True])
def test_every_sampled_image_belongs_to_its_labels_class(tmp_path, rotations):
    n_chars = _write_coded_tree(tmp_path)
    data = Omniglot(tmp_path)
    # the loader keeps the codes: image i of class c decodes to (c, i, unrotated)
    assert [_decode(data.images[c][i]) for c in range(n_chars) for i in range(6)] == \
        [(c, i, 0) for c in range(n_chars) for i in range(6)]
    ways, shots, queries = 4, 2, 3
    tasks = OmniglotTasks(data, data.alphabets, ways=ways, shots=shots, queries=queries, rotations=rotations, seed=5)
    b = tasks.sample(12)
    seen_classes = set()
    for t in range(12):
        sup = [_decode(x) for x in b.support_x[t]]
        qry = [_decode(x) for x in b.query_x[t]]
        cls_of_label = {}
        for (char, draw, rot), lab in zip(sup + qry, b.support_y[t].tolist() + b.query_y[t].tolist()):
            cls_of_label.setdefault(lab, set()).add((char, rot))
        # every label is one class (character and rotation) across support and query ...
        assert sorted(cls_of_label) == list(range(ways))
        assert all(len(v) == 1 for v in cls_of_label.values()), (t, cls_of_label)
        classes = [next(iter(v)) for v in cls_of_label.values()]
        assert len(set(classes)) == ways                            # ... and the labels are different classes
        seen_classes.update(classes)
        for lab in range(ways):
            ds = [d for (_, d, _), y in zip(sup, b.support_y[t].tolist()) if y == lab]
            dq = [d for (_, d, _), y in zip(qry, b.query_y[t].tolist()) if y == lab]
            assert len(ds) == shots and len(dq) == queries
            assert len(set(ds + dq)) == shots + queries             # distinct drawings, none shared
    # all characters (and, with rotations, all four orientations) are drawn over 12 tasks
    assert {c for c, _ in seen_classes} == set(range(n_chars))
    assert {r for _, r in seen_classes} == ({0, 1, 2, 3} if rotations else {0})
