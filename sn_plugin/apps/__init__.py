"""Applications: the importable code behind the project's commands (``tools/``). Each imports its toolkit
(mmdet, mmengine...) only when it runs, so importing this package needs only what ``sn_plugin.data`` needs."""
