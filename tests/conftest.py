import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

# The tests use tiny tensors: one intra-op thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

# Trained tokenizers (`--tokenizer bpe:N`) are cached here for the session, never in the user's cache.
os.environ["SUBSPACE_OPTIM_CACHE"] = tempfile.mkdtemp(prefix="subspace-optim-cache-")
atexit.register(shutil.rmtree, os.environ["SUBSPACE_OPTIM_CACHE"], True)


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (FSDP2 needs one; its parameters are then 1-shard DTensors)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
