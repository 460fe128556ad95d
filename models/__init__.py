"""The detectors (one file each), their interface (base.py), artifacts, data readers and CLI."""
import sys

# torch's optimizers look for triton (a GPU kernel compiler for torch.compile, which logwarden
# never calls); once imported, triton's nanobind bindings print hundreds of "leaked" lines when
# the interpreter exits. Keep it out unless something imported it before us.
sys.modules.setdefault("triton", None)
