"""Which device a process trains on (raygpt.training.runtime.process_device), with fake GPU counts."""

import pytest
import torch

from raygpt.errors import UserError
from raygpt.training.runtime import process_device


def test_cpu_unless_gpus_are_asked_for():
    assert process_device(use_gpu=False, local_rank=3, cuda_count=8) == torch.device("cpu")


def test_each_local_rank_gets_its_own_gpu():
    assert [process_device(True, rank, 4) for rank in range(4)] == [torch.device("cuda", r) for r in range(4)]


def test_no_gpu_visible_is_refused_not_a_silent_cpu_run():
    with pytest.raises(UserError, match="run.use_gpu is true but this torch sees no GPU") as info:
        process_device(True, 0, 0)
    assert "\n" not in str(info.value)


def test_more_processes_than_gpus_on_a_node_is_refused():
    with pytest.raises(UserError, match="LOCAL_RANK 2 .* 2 GPUs"):
        process_device(True, 2, 2)


def test_a_gpu_run_on_a_machine_without_one_is_refused_before_anything_is_written(run_cli, tmp_path):
    from helpers import make_corpus, one_line_error, tiny_overrides

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = make_corpus(tmp_path / "corpus")
    sets = [a for o in tiny_overrides(data, tmp_path / "runs") for a in ("--set", o)]
    err = one_line_error(run_cli, "train", "--no-ray", *sets, "--set", "run.use_gpu=true", "--set", "run.name=gpu")
    assert "run.use_gpu is true but this torch sees no GPU" in err
    assert not (tmp_path / "runs" / "gpu").exists()


def test_no_ray_refuses_to_train_into_an_existing_run_without_resume(run_cli, tmp_path):
    """As the Ray path does: an existing run folder is continued only with --resume (a user's
    folder named by run.name is never written into)."""
    from helpers import make_corpus, one_line_error, tiny_overrides

    data = make_corpus(tmp_path / "corpus")
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "notes.txt").write_text("not a run")
    sets = [a for o in tiny_overrides(data, tmp_path / "runs") for a in ("--set", o)]
    err = one_line_error(run_cli, "train", "--no-ray", *sets, "--set", "run.name=mine")
    assert "run mine already exists in" in err and "--resume mine" in err
    assert sorted(p.name for p in (tmp_path / "runs" / "mine").iterdir()) == ["notes.txt"]
