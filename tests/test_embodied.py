"""The simulated task for vision-language-action policies (mmfm.embodied.reach, docs/embodied.md)."""

import numpy as np
import pytest

from mmfm.embodied.reach import (GRASP_RADIUS, MAX_STEPS, ReachGraspEnv, blind_action, expert_action, new_scene,
                                 random_action, success_rate)

HELD_OUT = range(10_000, 10_200)


def test_the_scripted_expert_succeeds_and_baselines_do_not():
    """Over 200 seeded episodes: the expert >= 95%; a policy that grasps one of the objects without reading the
    instruction about 1/3 (its best without the words), random actions about never."""
    expert, blind, random_ = (success_rate(p, HELD_OUT) for p in (expert_action, blind_action, random_action))
    assert expert >= 0.95, expert
    assert 0.2 <= blind <= 0.5, blind
    assert random_ <= 0.05, random_


def test_the_instruction_is_needed_to_tell_the_objects_apart():
    """Each distractor shares the target's colour or its shape: neither word alone names the target."""
    for seed in range(200):
        (shape, colour, *_), *others = new_scene(seed).objects
        assert sorted((s == shape, c == colour) for s, c, *_ in others) == [(False, True), (True, False)]


def test_episodes_are_deterministic_and_follow_gymnasium_s_api():
    from gymnasium.utils.env_checker import check_env

    check_env(ReachGraspEnv(), skip_render_check=True)
    a, b = ReachGraspEnv(), ReachGraspEnv()
    (obs_a, info_a), (obs_b, info_b) = a.reset(seed=7), b.reset(seed=7)
    assert info_a["instruction"] == info_b["instruction"] and np.array_equal(obs_a["image"], obs_b["image"])
    assert not np.array_equal(obs_a["image"], a.reset(seed=8)[0]["image"])
    assert obs_a["image"].shape == (64, 64, 3) and obs_a["image"].dtype == np.uint8


def test_a_grasp_ends_the_episode_and_succeeds_only_on_the_named_object():
    env = ReachGraspEnv()
    env.reset(seed=3)
    scene = env.scene
    _, _, x, y = scene.objects[1]  # a distractor
    scene.gripper = np.array([x, y], dtype=np.float32)
    _, reward, terminated, truncated, info = env.step([0.0, 0.0, 1.0])
    assert (reward, terminated, truncated, info["success"]) == (0.0, True, False, False)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step([0.0, 0.0, 1.0])
    env.reset(seed=3)
    env.scene.gripper = env.scene.target + np.float32(GRASP_RADIUS * 0.9)  / np.sqrt(2)
    _, reward, terminated, _, info = env.step([0.0, 0.0, 1.0])
    assert (reward, terminated, info["success"]) == (1.0, True, True)
    env.reset(seed=3)
    for step in range(MAX_STEPS):  # never closing: truncated at the step limit
        _, _, terminated, truncated, _ = env.step([0.0, 0.0, -1.0])
    assert truncated and not terminated
