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
