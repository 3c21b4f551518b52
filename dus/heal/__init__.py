"""`dus heal`: fine-tune an assembled model so that its seams stop hurting.

A thin layer over TRL's SFTTrainer and PEFT: config.py reads the YAML (TRL/PEFT fields
pass straight through), data.py turns any accepted data format into one TRL reads,
targets.py picks the layers around the seams, distill.py adds the teacher's KL loss,
tracking.py sets W&B up, run.py wires it together and merge.py writes the healed model.
"""

from dus.heal.config import HealConfig, load_config
from dus.heal.run import HealResult, heal

__all__ = ["HealConfig", "HealResult", "heal", "load_config"]
