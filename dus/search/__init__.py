"""`dus search`: find a layer recipe by scoring candidates assembled in memory.

space.py encodes a path over source layers as a real vector (what CMA-ES needs);
fitness.py scores a candidate without writing it; optimizers.py wraps the libraries;
journal.py makes a search resumable; report.py writes the ranked recipes and plots;
run.py ties them together for the CLI.
"""
