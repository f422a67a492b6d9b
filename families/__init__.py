"""The self-supervised families of the paper's first question (Sec. 2, RQ1), one file each: MoCo v3, BYOL, DINO, MAE.

Each file holds everything its family adds to the shared ViT: its networks, its loss (the formula in the docstring, a
literal reference form beside the fast one), its views, its recipe, its schedules and momentum/teacher updates, and
the checks of its flags. pretrain.py's OBJECTIVES table names them, one row a family; common.py holds what several
share.
"""
