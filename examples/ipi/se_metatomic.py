"""i-PI driver for shallow-ensemble models: i-PI's metatomic driver, plus sphericart.

sphericart-torch registers the derivatives of its spherical-harmonics operator from
Python (``import sphericart.torch``). i-PI's ``-m metatomic`` driver only loads the
compiled library from the model's ``extensions`` folder, so the operator has no
autograd kernel there and the forces it computes are wrong (PyTorch warns "an autograd
kernel was not registered"). Importing ``sphericart.torch`` before the model is loaded
fixes this; use this file with ``i-pi-py_driver -m custom -P se_metatomic.py`` (same
``-o`` options as ``-m metatomic``) or ``<ffdirect><pes>custom</pes><pes_path>``.
"""

import sphericart.torch  # noqa: F401  (registers the operator's autograd)
from ipi.pes.metatomic import MetatomicDriver  # noqa: F401


__DRIVER_NAME__ = "se_metatomic"
__DRIVER_CLASS__ = "MetatomicDriver"
