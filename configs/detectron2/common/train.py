# detectron2's training options (common/train.py in its model zoo) with SN's two hooks, which
# the LazyConfig train command (tools/lazyconfig_train_net_d2.py) adds to the trainer. It
# fills in their model and data_loader; set one to null (train.sn_batch_stats=null) to leave
# it out.
#
# sn_batch_stats: the paper evaluates SN with the batch average of its BN branch's
# statistics (Sec. 2.1). SNBatchStatsHook re-estimates them from training batches
# (num_batches per process) after every eval_period-th iteration and after the last one,
# before the checkpoint and the evaluation of that iteration.
# sn_weight_logger: SN's importance weights into the metrics (metrics.json, TensorBoard)
# every log_period iterations.
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from sn_plugin.integrations.detectron2 import SNBatchStatsHook, SNWeightLoggerHook

train = get_config("common/train.py").train
train.sn_batch_stats = L(SNBatchStatsHook)(period="${..eval_period}")
train.sn_weight_logger = L(SNWeightLoggerHook)(period="${..log_period}")
