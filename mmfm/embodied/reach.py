"""`ReachGrasp`: the simulated task the project ships for vision-language-action policies (docs/embodied.md).

A planar gripper over a table with four objects drawn as the demo's captioner sees them (mmfm.data.synth: its
colours and shapes): two colours times two shapes, all four kinds. The instruction names one ("pick up the red
circle."); of the others one shares its colour, one its shape and one neither, so neither word alone tells which one,
and the table alone does not either (every object stands in the same relation to the rest). An action is (x, y, grip)
in [-1, 1], position control as on most arms: the gripper moves toward the point (x, y) of the table (mapped from
[-1, 1] to [0, 1]) by at most MAX_STEP, and grip > 0 closes it, which ends the episode: a success when the gripper
is over the named object. Episodes are deterministic from their seed, cheap on a CPU (a 64 x 64 image per step), and
end after MAX_STEPS steps without a grasp.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw

from mmfm.data.synth import COLOURS, RENDER_SCALE, SHAPES, _draw_shape

OBJECT_COLOURS = tuple(c for c in COLOURS if c != "white")  # white is the gripper's
IMAGE_SIZE = 64
NUM_OBJECTS = 4  # two colours x two shapes
EVERY_OBJECT = tuple(range(NUM_OBJECTS))  # `named` for each table once per object
OBJECT_RADIUS = 0.09  # of the table's side
GRASP_RADIUS = 0.08  # the gripper's centre this close to an object's grasps it
MAX_STEP = 0.1  # the farthest the gripper moves in one step
MAX_STEPS = 24
MIN_GAP = 0.3  # between objects' centres, and from the gripper's start to any object


@dataclass
class Scene:
    objects: list[tuple[str, str, float, float]]  # (shape, colour, x, y), the target first
    gripper: np.ndarray  # (x, y) in [0, 1]
    background: tuple[int, int, int]
    steps: int = 0
    done: bool = False
    grasped: Optional[int] = None  # index of the object the gripper closed on
    trace: list = field(default_factory=list)

    @property
    def target(self) -> np.ndarray:
        return np.array(self.objects[0][2:], dtype=np.float32)

    @property
    def instruction(self) -> str:
        shape, colour = self.objects[0][:2]
        return f"pick up the {colour} {shape}."


def _place(rng: random.Random, taken: list[np.ndarray], lo: float = 0.15, hi: float = 0.85) -> np.ndarray:
    for _ in range(1000):
        point = np.array([rng.uniform(lo, hi), rng.uniform(lo, hi)], dtype=np.float32)
        if all(np.linalg.norm(point - other) >= MIN_GAP for other in taken):
            return point
    raise RuntimeError("no room on the table")  # cannot happen at these sizes


def new_scene(seed: int, named: int = 0) -> Scene:
    """The seed's scene. The seed draws which object the instruction names; `named` (0-3) moves on that many
    objects: 0 the seed's own instruction, 1-3 the same table asked for each of its other objects."""
    rng = random.Random(f"reach-grasp-{seed}")
    shapes, colours = rng.sample(SHAPES, 2), rng.sample(OBJECT_COLOURS, 2)
    kinds = [(shape, colour) for colour in colours for shape in shapes]
    points: list[np.ndarray] = []
    for _ in kinds:
        points.append(_place(rng, points))
    gripper = _place(rng, points, 0.05, 0.95)
    objects = [(s, c, float(p[0]), float(p[1])) for (s, c), p in zip(kinds, points)]
    objects.insert(0, objects.pop((rng.randrange(NUM_OBJECTS) + named) % NUM_OBJECTS))
    background = tuple(rng.randint(0, 45) for _ in range(3))
    return Scene(objects, gripper, background)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The table from above: the objects, and the gripper as a white ring (filled once closed)."""
    big = size * RENDER_SCALE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for shape, colour, x, y in scene.objects:
        _draw_shape(draw, shape, x * big, y * big, OBJECT_RADIUS * big, COLOURS[colour])
    gx, gy = scene.gripper * big
    r = 0.06 * big
    draw.ellipse((gx - r, gy - r, gx + r, gy + r), outline=COLOURS["white"], width=max(1, int(0.025 * big)),
                 fill=COLOURS["white"] if scene.done else None)
    return np.asarray(image.resize((size, size), Image.BOX))


class ReachGraspEnv(gym.Env):
    """gymnasium's interface: observation {"image": uint8 [64, 64, 3], "state": float32 [x, y] of the gripper},
    info["instruction"]; reward 1 on a successful grasp; terminated on any grasp, truncated after MAX_STEPS.
    reset(seed=s, options={"named": k}): the same table with another of its objects named (new_scene)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 5}
    instruction_key = "instruction"

    def __init__(self, image_size: int = IMAGE_SIZE, render_mode: Optional[str] = "rgb_array"):
        self.image_size = image_size
        self.render_mode = render_mode
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "state": spaces.Box(0.0, 1.0, (2,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.scene: Optional[Scene] = None

    def _observation(self) -> dict:
        return {"image": render(self.scene, self.image_size), "state": self.scene.gripper.astype(np.float32)}

    def _info(self) -> dict:
        return {"instruction": self.scene.instruction, "success": self.scene.grasped == 0, "steps": self.scene.steps}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        named = int((options or {}).get("named", 0))
        if named not in range(NUM_OBJECTS):
            raise ValueError(f"options['named']={named}: a scene has objects 0-{NUM_OBJECTS - 1}")
        self.scene = new_scene(int(seed if seed is not None else self.np_random.integers(2**31)), named)
        return self._observation(), self._info()

    def step(self, action):
        scene = self.scene
        if scene is None or scene.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(3), -1.0, 1.0)
        delta = (action[:2] + 1.0) / 2.0 - scene.gripper
        distance = float(np.linalg.norm(delta))
        move = delta if distance <= MAX_STEP else delta * (MAX_STEP / distance)
        scene.gripper = np.clip(scene.gripper + move, 0.0, 1.0).astype(np.float32)
        scene.steps += 1
        if action[2] > 0:
            scene.done = True
            near = [i for i, (_, _, x, y) in enumerate(scene.objects)
                    if math.dist((x, y), scene.gripper) <= GRASP_RADIUS]
            scene.grasped = min(near, key=lambda i: math.dist(scene.objects[i][2:], scene.gripper)) if near else -1
        truncated = not scene.done and scene.steps >= MAX_STEPS
        reward = 1.0 if scene.grasped == 0 else 0.0
        return self._observation(), reward, scene.done, truncated, self._info()

    def render(self):
        return render(self.scene, self.image_size)


# -- reference policies: (scene, rng) -> action -------------------------------------------------------------------


def toward(point: np.ndarray, gripper: np.ndarray, rng: random.Random, noise: float) -> np.ndarray:
    """Aim at point (with Gaussian noise of `noise` table widths), close the gripper once over it."""
    goal = np.asarray(point, dtype=np.float64) + np.array([rng.gauss(0, noise), rng.gauss(0, noise)])
    grip = 1.0 if float(np.linalg.norm(np.asarray(point) - gripper)) <= GRASP_RADIUS / 2 else -1.0
    return np.array([*np.clip(2.0 * goal - 1.0, -1, 1), grip], dtype=np.float32)


def expert_action(scene: Scene, rng: random.Random, noise: float = 0.01) -> np.ndarray:
    """The scripted expert: aims at the named object, with a little noise (varied demonstrations)."""
    return toward(scene.target, scene.gripper, rng, noise)


def blind_action(scene: Scene, rng: random.Random) -> np.ndarray:
    """What a policy that ignores the instruction can do at best: grasp one of the objects, chosen at random per
    episode (the same all episode): a quarter of the episodes."""
    if not scene.trace:
        scene.trace.append(rng.randrange(len(scene.objects)))
    _, _, x, y = scene.objects[scene.trace[0]]
    return toward(np.array([x, y]), scene.gripper, rng, 0.0)


def random_action(scene: Scene, rng: random.Random) -> np.ndarray:
    return np.array([rng.uniform(-1, 1) for _ in range(3)], dtype=np.float32)


def episodes_of(seeds, named=(0,)):
    """(seed, named object) pairs: each seed's table once per entry of `named` (0: its own instruction)."""
    return ((int(seed), k) for seed in seeds for k in named)


def success_rate(policy, seeds, rng_seed: int = 0, named=(0,)) -> float:
    """Fraction of the seeded episodes a (scene, rng) -> action policy ends with the named object grasped (each
    seed's table once per entry of `named`)."""
    env, rng, wins, episodes = ReachGraspEnv(), random.Random(rng_seed), 0, list(episodes_of(seeds, named))
    for seed, k in episodes:
        env.reset(seed=seed, options={"named": k})
        terminated = truncated = False
        while not (terminated or truncated):
            _, _, terminated, truncated, info = env.step(policy(env.scene, rng))
        wins += info["success"]
    return wins / len(episodes)


def record_demonstrations(seeds, noise: float = 0.01, rng_seed: int = 0, named=(0,)) -> list:
    """The scripted expert's successful episodes on these seeds (each table once per entry of `named`), as LeRobot
    episodes (frames before each action, the instruction as the task)."""
    from mmfm.embodied.lerobot import Episode, png_bytes

    env, rng, episodes = ReachGraspEnv(), random.Random(rng_seed), []
    for seed, k in episodes_of(seeds, named):
        obs, info = env.reset(seed=seed, options={"named": k})
        images, states, actions = [], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            action = expert_action(env.scene, rng, noise)
            images.append(png_bytes(obs["image"]))
            states.append(obs["state"])
            actions.append(action)
            obs, _, terminated, truncated, info = env.step(action)
        if info["success"]:
            episodes.append(Episode(len(episodes), info["instruction"], images, np.stack(states), np.stack(actions)))
    return episodes


FPS = 5


def write_demonstrations(out, episodes: int, seed: int = 0, each_object: bool = False, video: bool = False) -> dict:
    """`mmfm data robot-demos`: the expert on seeds seed .. seed + episodes - 1 (each_object: each table once per
    object, each named in turn), as a LeRobot data set in `out` (video: the camera as MP4, as lerobot's default)."""
    from tqdm import tqdm

    from mmfm.embodied.lerobot import write_dataset

    seeds = tqdm(range(seed, seed + episodes), desc="recording", unit="episode", leave=False)
    named = EVERY_OBJECT if each_object else (0,)
    return write_dataset(out, record_demonstrations(seeds, named=named), fps=FPS, robot_type="mmfm-reach-grasp",
                         state_names=["x", "y"], action_names=["x", "y", "grip"], video=video)
