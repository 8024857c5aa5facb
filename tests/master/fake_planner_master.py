"""Runs the real ``oobleck-master`` entry point with the test planner (master_fakes) injected."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # support
sys.path.insert(0, str(Path(__file__).parent))  # master_fakes

from master_fakes import make_fake_planner

from oobleck.master.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], planner=make_fake_planner()))
