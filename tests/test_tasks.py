import pytest
import torch

from fastmeta import TaskBatch


def make(T=3, Ns=5, Nq=7, ways=5):
    return dict(support_x=torch.randn(T, Ns, 4), support_y=torch.randint(0, ways, (T, Ns)),
                query_x=torch.randn(T, Nq, 4), query_y=torch.randint(0, ways, (T, Nq)))


def test_valid_batch_and_select():
    b = TaskBatch(**make(), ways=5)
    assert b.num_tasks == 3 and len(b) == 3
    one = b.select(1)
    assert one.num_tasks == 1 and torch.equal(one.query_x[0], b.query_x[1])
    assert b.hessian[0] is b.support_x


@pytest.mark.parametrize("field,value,match", [
    ("query_x", torch.randn(4, 7, 4), "query_x"),
    ("query_y", torch.randint(0, 5, (4, 7)), "query_y"),
    ("support_y", torch.randint(0, 5, (3, 6)), "support_y"),
    ("support_x", torch.randn(3), "support_x"),
])
def test_mismatched_shapes_name_the_argument(field, value, match):
    kw = make()
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        TaskBatch(**kw)


def test_labels_outside_ways():
    kw = make()
    kw["query_y"][0, 0] = 5
    with pytest.raises(ValueError, match=r"query_y: labels must lie in \[0, 5\)"):
        TaskBatch(**kw, ways=5)
    kw["query_y"][0, 0] = -1
    with pytest.raises(ValueError, match="query_y"):
        TaskBatch(**kw, ways=5)


def test_empty_batch():
    with pytest.raises(ValueError, match="no tasks"):
        TaskBatch(**make(T=0))


def test_hessian_pair_and_task_count():
    kw = make()
    with pytest.raises(ValueError, match="hessian"):
        TaskBatch(**kw, hessian_x=torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="hessian_x"):
        TaskBatch(**kw, hessian_x=torch.randn(2, 2, 4), hessian_y=torch.zeros(2, 2, dtype=torch.long))
    b = TaskBatch(**kw, hessian_x=torch.randn(3, 2, 4), hessian_y=torch.zeros(3, 2, dtype=torch.long))
    assert b.hessian[0].shape == (3, 2, 4)


def test_float_labels_rejected_for_classification():
    kw = make()
    kw["support_y"] = kw["support_y"].float()
    with pytest.raises(ValueError, match="support_y"):
        TaskBatch(**kw, ways=5)
