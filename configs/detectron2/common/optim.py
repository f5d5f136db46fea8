# detectron2's SGD (common/optim.py in its model zoo: LR 0.02, momentum 0.9, weight decay
# 1e-4, none on norm parameters) with sn_plugin's get_default_optimizer_params, which counts
# SN's gamma, beta and importance logits as norm parameters; detectron2's own does not know SN.
#
# Paper (Luo et al., ICLR 2019), Appendix D: "For all settings, we set weight decay to 0 for
# both gamma and beta following (Wu & He, 2018)."
from detectron2.model_zoo import get_config

from sn_plugin.integrations.detectron2 import get_default_optimizer_params

SGD = get_config("common/optim.py").SGD
SGD.params._target_ = get_default_optimizer_params
