"""Helpers of scripts/bench-peers: Keepsake next to the tools people would otherwise pick.

model.py   the model versions (numpy .npz) and the small code directory
venvs.py   one cached virtualenv per peer, under ~/.cache/keepsake-bench/
tools.py   per tool: run the training driver, measure bytes, list, restore
report.py  the tables
drive.py   the stand-in training run; runs under each tool's own interpreter (stdlib only)
"""
