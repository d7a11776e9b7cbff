"""Suite-wide settings: one intra-op thread (tiny tensors; oversubscribed threads on 2 shared cores are 10-100x slower)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
