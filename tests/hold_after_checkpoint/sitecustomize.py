"""Test hook, active only in processes started with this folder on PYTHONPATH: once the trainer
has saved its first checkpoint it touches $SPECULATORS_TEST_HOLD_MARKER and waits there, so a
test interrupts training at a known point instead of racing it (tests/test_resume.py)."""

import importlib.abc
import importlib.util
import os
import sys
import time

MODULE = "speculators.train.checkpoint"


class _HoldAfterSave(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            save = module.Checkpointer.save

            def save_then_hold(self, *args, **kwargs):
                save(self, *args, **kwargs)
                with open(os.environ["SPECULATORS_TEST_HOLD_MARKER"], "w"):
                    pass
                while True:  # until the test interrupts the run
                    time.sleep(0.5)

            module.Checkpointer.save = save_then_hold

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SPECULATORS_TEST_HOLD_MARKER"):
    sys.meta_path.insert(0, _HoldAfterSave())
