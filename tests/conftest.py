import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# one thread per xdist worker (the workers already fill the cores); otherwise follow OMP_NUM_THREADS
_threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else int(os.environ.get("OMP_NUM_THREADS", 0) or 2)
torch.set_num_threads(max(1, min(_threads, os.cpu_count() or 1)))
