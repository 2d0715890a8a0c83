import os

# See pipeline/__main__.py: spinning OpenMP threads crawl when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
