"""The built-in fusion rules, one module each.  Importing this package registers them.

Within one op, rules are tried in this order: earlier ones prepare the ground
for later ones (a BN branch becomes a conv before branches are summed).
"""

from repalgebra.rules import (  # noqa: F401  (registration)
    identity_elim,
    bn_fold,
    scale_fold,
    bias_fold,
    border_fill,
    pad_share,  # before bn_to_conv, which imports it: a BN beside a conv of a padded copy becomes a 1x1 only where it moves
    bn_to_conv,
    identity_to_conv,
    dilation_to_dense,
    kernel_pad,
    branch_sum,
    concat_merge,
    sum_regroup,
    pad_absorb,
    crop_into_conv,
    crop_before_conv,
    avg_pool_to_conv,
    space_to_depth,
    bn_before_conv,
    scale_into_conv,
    bn_into_linear,
    linear_affine_fold,
    linear_seq_merge,
    query_scale_fold,
    attention_form,
    seq_merge,
)
