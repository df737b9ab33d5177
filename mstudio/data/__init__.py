"""Episode data: the on-disk stores, windows, samplers and loaders, the VPT contractor and MineStudio LMDB
importers, and synthetic data."""

from mstudio.data._base import Store
from mstudio.data.contractor_import import import_vpt
from mstudio.data.contractor_synth import synthesize_contractor
from mstudio.data.loader import Loader, make_loader
from mstudio.data.minestudio_import import import_minestudio
from mstudio.data.minestudio_synth import synthesize_minestudio
from mstudio.data.samplers import EpisodeContinuous, EpisodeContinuousBatchSampler, RandomWindows, Sampler
from mstudio.data.sharded import ShardedStore
from mstudio.data.store import EpisodeStore
from mstudio.data.stores import create_store, open_store
from mstudio.data.synthetic import fill_store, random_batch
from mstudio.data.video_codec import VideoCodec
from mstudio.data.windows import WindowDataset

__all__ = [
    "EpisodeContinuous",
    "EpisodeContinuousBatchSampler",  # deprecated: EpisodeContinuous through make_loader
    "EpisodeStore",
    "Loader",
    "RandomWindows",
    "Sampler",
    "ShardedStore",
    "Store",
    "VideoCodec",
    "WindowDataset",
    "create_store",
    "fill_store",
    "import_minestudio",
    "import_vpt",
    "make_loader",
    "open_store",
    "random_batch",
    "synthesize_contractor",
    "synthesize_minestudio",
]


def __dir__() -> list[str]:
    return __all__
