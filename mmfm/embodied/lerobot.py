"""LeRobot data sets on disk, read and written without the lerobot package (docs/embodied.md).

Read: codebase v3.0 (episodes packed into data/chunk-C/file-F.parquet, meta/episodes/*.parquet, meta/tasks.parquet)
and v2.x (one data/chunk-C/episode_E.parquet per episode, meta/episodes.jsonl, meta/tasks.jsonl), one camera: an image
feature stored in the parquet files, or a video feature stored as MP4 files (meta/info.json's video_path; v3.0: the
episode's file and its start in it from the episodes parquet, v2.x: one file per episode), decoded with PyAV
(mmfm.embodied.video), frame t the decoded frame nearest the episode's start + its timestamp, within half a frame
period, stored as PNG. Every file is untrusted: meta/info.json is size-capped JSON, a data or video file's path comes
from its template with integer indices and must stay inside the data set's folder, nothing is unpickled.

A bad episode is skipped with its reason: "missing_frames" (fewer rows than its length, frame indices out of order,
an image without bytes, a frame time without a video frame within the tolerance), "bad_video" (its video file is
missing or does not decode), "wrong_dimension" (a state or action vector of another length than meta/info.json's),
"nan_action" / "nan_state" (a non-finite value).

Written (the simulated task's demonstrations, `mmfm data robot-demos`): codebase v3.0 as lerobot 0.4 writes it, one
data file and one episodes file, images as PNG in the parquet (or, video=True, the camera as one MP4 with lerobot's
default encoding), meta/stats.json for the state and the action.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from mmfm.data.manifest import DataError, UnsafePath, contained
from mmfm.embodied.video import UnusableFrames, frames_at, pyav, rgb, write_video

INFO = "meta/info.json"
MAX_INFO_BYTES = 4 << 20
CODEBASE = "v3.0"
READ_VERSIONS = ("v2.0", "v2.1", "v3.0")
STATE, ACTION = "observation.state", "action"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_EPISODES = "meta/episodes/chunk-000/file-000.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CAMERA_DTYPES = ("image", "video")


class LeRobotError(DataError):
    pass


@dataclass
class Episode:
    index: int
    task: str
    images: list[bytes]  # one encoded frame per step, of the chosen camera
    states: np.ndarray  # [T, state dims] float32
    actions: np.ndarray  # [T, action dims] float32


@dataclass
class BadEpisode:
    index: int
    reason: str
    detail: str


# -- reading ------------------------------------------------------------------------------------------------------


def read_info(root: Path) -> dict:
    path = Path(root) / INFO
    if not path.is_file():
        raise LeRobotError(f"{root} is not a LeRobot data set (no {INFO})")
    if path.stat().st_size > MAX_INFO_BYTES:
        raise LeRobotError(f"{path} is over {MAX_INFO_BYTES >> 20} MiB; it is not a LeRobot info file")
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeRobotError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise LeRobotError(f"{path} has no \"features\" object; it is not a LeRobot info file")
    version = info.get("codebase_version")
    if version not in READ_VERSIONS:
        raise LeRobotError(f"{path}: codebase_version {version!r} is not read; mmfm reads {', '.join(READ_VERSIONS)} "
                           "(convert older data sets with lerobot's conversion scripts)")
    return info


def pick_camera(info: dict, camera: str = "") -> str:
    """The camera to read (an image or a video feature): `camera`, or the data set's only one."""
    cameras = [k for k, f in info["features"].items() if isinstance(f, dict) and f.get("dtype") in CAMERA_DTYPES]
    if camera:
        if camera not in cameras:
            raise LeRobotError(f"camera {camera!r} is not an image or video feature of the data set; it has "
                               f"{cameras or 'none'}")
        return camera
    if len(cameras) == 1:
        return cameras[0]
    raise LeRobotError(f"the data set has {len(cameras)} image or video features {cameras}: name one with "
                       "camera=...")


def is_video(info: dict, camera: str) -> bool:
    """Whether the camera is stored as video files (else as images in the parquet files)."""
    return info["features"][camera].get("dtype") == "video"


def frame_tolerance(info: dict) -> float:
    """How far (seconds) a decoded video frame may lie from a frame's time: half a frame period."""
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise LeRobotError(f"{INFO}: fps {fps!r} is not a positive number; video frames are found by their time")
    return 0.5 / fps


def _dims(info: dict, key: str) -> int:
    feature = info["features"].get(key)
    if not isinstance(feature, dict) or not isinstance(feature.get("shape"), list) or len(feature["shape"]) != 1:
        raise LeRobotError(f"{INFO} has no 1-D feature {key!r}; a robot data set needs {STATE!r} and {ACTION!r}")
    return int(feature["shape"][0])


def _inside(root: Path, info: dict, field: str, **indices: Union[int, str]) -> Path:
    """The file info[field] (a path template: data_path, video_path) names for `indices`, refused unless inside root."""
    template = info.get(field)
    if not isinstance(template, str):
        raise LeRobotError(f"{INFO}: {field} {template!r} is not a path template")
    try:
        name = template.format(**indices)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise LeRobotError(f"{INFO}: {field} {template!r} does not format ({exc})") from None
    try:
        return contained(root, name)
    except UnsafePath as exc:
        raise LeRobotError(f"{INFO}: {field} gives an unsafe file name: {exc}") from None


def _read_table(path: Path):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise LeRobotError(f"{path} is missing; the data set is incomplete")
    try:
        return pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise LeRobotError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc})") from None


def _tasks(root: Path, version: str) -> dict[int, str]:
    if version == "v3.0":
        table = _read_table(root / "meta/tasks.parquet").to_pydict()
        names = table.get("task") or table.get("__index_level_0__")
        if names is None or "task_index" not in table:
            raise LeRobotError(f"{root / 'meta/tasks.parquet'} has no task / task_index columns")
        return {int(i): str(t) for i, t in zip(table["task_index"], names)}
    return {int(row["task_index"]): str(row["task"]) for row in _jsonl(root / "meta/tasks.jsonl")}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise LeRobotError(f"{path} is missing; the data set is incomplete")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LeRobotError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
    return rows


def _episode_rows(root: Path, info: dict, video: str = "") -> list[dict]:
    """One dict per episode: episode_index, length, and where its rows are (and, v3.0, its frames of the camera
    `video`)."""
    if info["codebase_version"] == "v3.0":
        files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise LeRobotError(f"{root / 'meta/episodes'} holds no episodes parquet; the data set is incomplete")
        columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        columns += [f"videos/{video}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")] if video else []
        rows = []
        for f in files:
            rows += _columns(_read_table(f), columns, f).to_pylist()
        return sorted(rows, key=lambda r: r["episode_index"])
    chunk = int(info.get("chunks_size") or 1000)
    return [{"episode_index": int(r["episode_index"]), "length": int(r["length"]),
             "episode_chunk": int(r["episode_index"]) // chunk} for r in _jsonl(root / "meta/episodes.jsonl")]


def _columns(table, names: list[str], path: Path):
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise LeRobotError(f"{path} has no column(s) {missing}")
    return table.select(names)


def _data_file(root: Path, info: dict, row: dict) -> Path:
    if info["codebase_version"] == "v3.0":
        return _inside(root, info, "data_path", chunk_index=int(row["data/chunk_index"]),
                       file_index=int(row["data/file_index"]))
    return _inside(root, info, "data_path", episode_chunk=row["episode_chunk"], episode_index=row["episode_index"])


def _video_file(root: Path, info: dict, camera: str, row: dict) -> tuple[Path, float]:
    """The video file holding the episode's frames of `camera`, and the time (seconds) in it of the episode's start."""
    if info["codebase_version"] == "v3.0":
        where = {k: row[f"videos/{camera}/{k}"] for k in ("chunk_index", "file_index", "from_timestamp")}
        if any(v is None for v in where.values()):
            raise UnusableFrames("bad_video", f"the episodes metadata gives no video location for {camera!r}")
        return _inside(root, info, "video_path", video_key=camera, chunk_index=int(where["chunk_index"]),
                       file_index=int(where["file_index"])), float(where["from_timestamp"])
    return _inside(root, info, "video_path", video_key=camera, episode_chunk=row["episode_chunk"],
                   episode_index=row["episode_index"]), 0.0


def read_episodes(root: Union[str, Path], camera: str = "", images: bool = True) -> \
        Iterator[Union[Episode, BadEpisode]]:
    """Every episode of the data set, in episode order, or why it is unusable. images=False: the same episodes
    kept and dropped, but Episode.images empty (no frame encoded as PNG; for statistics)."""
    root = Path(root)
    info = read_info(root)
    camera = pick_camera(info, camera)
    video = is_video(info, camera)
    if video:
        pyav()  # a one-line error before any work when PyAV is missing
        if not isinstance(info.get("video_path"), str):
            raise LeRobotError(f"{INFO}: camera {camera!r} is stored as video but video_path "
                               f"{info.get('video_path')!r} is not a path template")
    state_dims, action_dims = _dims(info, STATE), _dims(info, ACTION)
    tasks = _tasks(root, info["codebase_version"])
    columns = [STATE, ACTION, "episode_index", "frame_index", "task_index", "timestamp" if video else camera]
    tolerance = frame_tolerance(info) if video else 0.0
    cached: tuple[Optional[Path], dict] = (None, {})
    for row in _episode_rows(root, info, camera if video else ""):
        path = _data_file(root, info, row)
        if cached[0] != path:
            cached = (path, _by_episode(_columns(_read_table(path), columns, path).to_pydict()))
        frames = cached[1].get(int(row["episode_index"]), [])
        if video:
            pictures = partial(_video_images, root, info, camera, row, tolerance=tolerance, keep=images)
        else:
            pictures = partial(_stored_images, camera=camera, keep=images)
        yield _episode(int(row["episode_index"]), int(row["length"]), frames, pictures, state_dims, action_dims,
                       tasks)


def _by_episode(columns: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for i, episode in enumerate(columns["episode_index"]):
        out.setdefault(int(episode), []).append({k: v[i] for k, v in columns.items()})
    return out


def _stored_images(frames: list[dict], camera: str, keep: bool) -> list[bytes]:
    """The frames' encoded images as stored in the parquet files."""
    images = [(f[camera] or {}).get("bytes") if isinstance(f[camera], dict) else None for f in frames]
    missing = [t for t, image in enumerate(images) if not image]
    if missing:
        raise UnusableFrames("missing_frames", f"frame {missing[0]} has no image bytes")
    return images if keep else []


def _video_images(root: Path, info: dict, camera: str, row: dict, frames: list[dict], tolerance: float,
                  keep: bool) -> list[bytes]:
    """The frames' images decoded from the episode's video file (frame t at its start + the frame's timestamp), as
    PNG."""
    path, start = _video_file(root, info, camera, row)
    times = [start + f["timestamp"] if f["timestamp"] is not None else np.nan for f in frames]
    images = frames_at(path, times, tolerance, _png if keep else lambda frame: b"")
    return images if keep else []


def _png(frame) -> bytes:
    """A decoded video frame as PNG bytes."""
    return png_bytes(rgb(frame))


def png_bytes(pixels: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] as PNG bytes: how an episode's frames are stored (the inverse of _pixels)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _episode(index: int, length: int, frames: list[dict], images: Callable[[list[dict]], list[bytes]],
             state_dims: int, action_dims: int, tasks: dict[int, str]) -> Union[Episode, BadEpisode]:
    """The episode, or why it is unusable; its images (images(frames), the costliest step) come last."""
    order = [f["frame_index"] for f in frames]
    if len(frames) != length or order != list(range(length)):
        return BadEpisode(index, "missing_frames", f"{len(frames)} rows for length {length}, frame indices "
                                                   f"{order[:3]}...")
    for key, dims in ((STATE, state_dims), (ACTION, action_dims)):
        if any(value is None or len(value) != dims for value in (f[key] for f in frames)):
            return BadEpisode(index, "wrong_dimension", f"a {key} vector is not of length {dims}")
    states = np.asarray([f[STATE] for f in frames], dtype=np.float32)
    actions = np.asarray([f[ACTION] for f in frames], dtype=np.float32)
    for name, values in (("nan_action", actions), ("nan_state", states)):
        if not np.isfinite(values).all():
            return BadEpisode(index, name, f"non-finite value at frame {int(np.argwhere(~np.isfinite(values))[0][0])}")
    task = tasks.get(int(frames[0]["task_index"]))
    if task is None:
        return BadEpisode(index, "missing_frames", f"task_index {frames[0]['task_index']} is not in the task list")
    try:
        return Episode(index, task, images(frames), states, actions)
    except UnusableFrames as exc:
        return BadEpisode(index, exc.reason, exc.detail)


def action_chunk(actions: np.ndarray, t: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """The actions of steps t .. t + horizon - 1, the episode's last one repeated past its end, and which of them are
    such padding."""
    steps = np.minimum(np.arange(t, t + horizon), len(actions) - 1)
    return actions[steps], np.arange(t, t + horizon) >= len(actions)


def stats(values: np.ndarray) -> dict:
    """Per-dimension statistics of [N, D] values, as meta/stats.json holds them."""
    values = np.asarray(values, dtype=np.float64)
    q = np.quantile(values, [0.01, 0.99], axis=0)
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [int(len(values))], "q01": q[0].tolist(), "q99": q[1].tolist()}


# -- writing ------------------------------------------------------------------------------------------------------


def write_dataset(root: Union[str, Path], episodes: Iterable[Episode], fps: int, robot_type: str,
                  camera: str = "observation.image", state_names: Optional[list[str]] = None,
                  action_names: Optional[list[str]] = None, video: bool = False) -> dict:
    """Episodes as a codebase v3.0 data set in the new folder `root`; returns its info. video: the camera as one MP4
    (lerobot's default encoding, mmfm.embodied.video) instead of PNG in the parquet."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise LeRobotError(f"{root} exists and is not empty; give a new folder")
    episodes = list(episodes)
    if not episodes:
        raise LeRobotError("no episodes to write")
    if video:
        pyav()
    state_dims, action_dims = episodes[0].states.shape[1], episodes[0].actions.shape[1]
    task_names = list(dict.fromkeys(e.task for e in episodes))
    task_index = {t: i for i, t in enumerate(task_names)}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns: dict[str, list] = {k: [] for k in ([] if video else [camera]) + [STATE, ACTION, "timestamp",
                                                "frame_index", "episode_index", "index", "task_index"]}
    rows, start = [], 0
    for n, e in enumerate(episodes):
        length = len(e.images)
        if not video:
            columns[camera] += [{"bytes": b, "path": f"frame-{t:06d}.png"} for t, b in enumerate(e.images)]
        columns[STATE] += e.states.tolist()
        columns[ACTION] += e.actions.tolist()
        columns["timestamp"] += [t / fps for t in range(length)]
        columns["frame_index"] += list(range(length))
        columns["episode_index"] += [n] * length
        columns["index"] += list(range(start, start + length))
        columns["task_index"] += [task_index[e.task]] * length
        rows.append({"episode_index": n, "tasks": [e.task], "length": length, "data/chunk_index": 0,
                     "data/file_index": 0, "dataset_from_index": start, "dataset_to_index": start + length,
                     "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                     **(_video_location(camera, start / fps, (start + length) / fps) if video else {})})
        start += length
    types = {camera: image_type, STATE: pa.list_(pa.float32(), state_dims),
             ACTION: pa.list_(pa.float32(), action_dims), "timestamp": pa.float32(), "frame_index": pa.int64(),
             "episode_index": pa.int64(), "index": pa.int64(), "task_index": pa.int64()}
    for folder in ("data/chunk-000", "meta/episodes/chunk-000"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    camera_feature = _camera_feature(root, camera, episodes, fps, video)
    pq.write_table(pa.table({k: pa.array(v, types[k]) for k, v in columns.items()}),
                   root / V3_DATA_PATH.format(chunk_index=0, file_index=0), compression="snappy")
    pq.write_table(pa.Table.from_pylist(rows), root / V3_EPISODES)
    pd.DataFrame({"task_index": list(range(len(task_names)))},
                 index=pd.Index(task_names, name="task")).to_parquet(root / "meta/tasks.parquet")
    all_states = np.concatenate([e.states for e in episodes])
    all_actions = np.concatenate([e.actions for e in episodes])
    (root / "meta/stats.json").write_text(json.dumps({STATE: stats(all_states), ACTION: stats(all_actions)},
                                                     indent=2))
    info = {"codebase_version": CODEBASE, "robot_type": robot_type, "total_episodes": len(episodes),
            "total_frames": start, "total_tasks": len(task_names), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200, "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
            "data_path": V3_DATA_PATH, "video_path": V3_VIDEO_PATH if video else None,
            "features": {camera: camera_feature,
                         STATE: {"dtype": "float32", "shape": [state_dims], "names": state_names},
                         ACTION: {"dtype": "float32", "shape": [action_dims], "names": action_names},
                         **{k: {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
                            for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")}}}
    (root / INFO).write_text(json.dumps(info, indent=4))
    return info


def _camera_feature(root: Path, camera: str, episodes: list[Episode], fps: int, video: bool) -> dict:
    """The camera's feature in meta/info.json; with video, its MP4 written (every episode, one after the other)."""
    height, width, channels = _image_shape(episodes[0].images[0])
    names = ["height", "width", "channels"]
    if not video:
        return {"dtype": "image", "shape": [height, width, channels], "names": names}
    path = root / V3_VIDEO_PATH.format(video_key=camera, chunk_index=0, file_index=0)
    info = write_video(path, (_pixels(image) for e in episodes for image in e.images), fps)
    return {"dtype": "video", "shape": [height, width, 3], "names": names, "info": info}


def _video_location(camera: str, start: float, end: float) -> dict:
    """An episode's columns in the episodes parquet locating its frames in the camera's one video file."""
    return {f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": 0,
            f"videos/{camera}/from_timestamp": start, f"videos/{camera}/to_timestamp": end}


def _pixels(data: bytes) -> np.ndarray:
    """An encoded image as RGB uint8 [H, W, 3]."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _image_shape(data: bytes) -> list[int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return [image.height, image.width, len(image.getbands())]
