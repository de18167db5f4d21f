"""RL for language models: GRPO / DAPO / Dr.GRPO losses and the reward registry."""

from jaxstack.rl.losses import (
    PolicyLossConfig,
    dynamic_sampling_keep,
    group_advantages,
    k3_kl,
    overlong_penalty,
    policy_loss,
    token_entropy,
)
from jaxstack.rl.rewards import (
    REWARDS,
    combine_rewards,
    get_reward,
    math_equal,
    parse_answer,
    parse_choice,
    register_reward,
)

__all__ = [
    "REWARDS",
    "PolicyLossConfig",
    "combine_rewards",
    "dynamic_sampling_keep",
    "get_reward",
    "group_advantages",
    "k3_kl",
    "math_equal",
    "overlong_penalty",
    "parse_answer",
    "parse_choice",
    "policy_loss",
    "register_reward",
    "token_entropy",
]
