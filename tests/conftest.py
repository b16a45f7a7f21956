import atexit
import os
import shutil
import sys
import tempfile

import torch

# The tests use tiny tensors: one intra-op thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

# Trained tokenizers (`--tokenizer bpe:N`) are cached here for the session, never in the user's cache.
os.environ["SUBSPACE_OPTIM_CACHE"] = tempfile.mkdtemp(prefix="subspace-optim-cache-")
atexit.register(shutil.rmtree, os.environ["SUBSPACE_OPTIM_CACHE"], True)
