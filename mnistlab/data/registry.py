"""The datasets mnistlab knows by name: their files, hashes, mirrors and class names.

Hashes are of two forms. `gz_sha256` is the published archive as the mirrors serve it (these are
what a download is checked against). `raw_sha256` is the uncompressed IDX payload: it verifies a
copy that was recompressed (Debian's dataset-fashion-mnist package ships the same payload in
re-made .gz files) or unpacked by hand. Where no raw hash is recorded, an uncompressed copy is
checked by its IDX header and counts alone, and `mnistlab data verify` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The four standard file stems; each may sit on disk as `<stem>.gz` or as `<stem>`.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_STEMS = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class FileSpec:
    stem: str
    gz_sha256: str
    size: int  # bytes of the .gz as published; used for the progress bar and the size cap
    raw_sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    source: str
    classes: tuple[str, ...]
    files: tuple[FileSpec, ...] = ()
    mirrors: tuple[str, ...] = ()
    train_count: int = 60_000
    test_count: int = 10_000
    system_dirs: tuple[str, ...] = field(default=())
    mirror_symmetric: bool = False  # classes unchanged by a left-right flip (clothes yes, digits no)

    @property
    def is_idx(self) -> bool:
        return bool(self.files)

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in self.files)


DATASETS: dict[str, DatasetSpec] = {}


def _register(spec: DatasetSpec) -> None:
    DATASETS[spec.name] = spec


_register(DatasetSpec(
    name="mnist",
    description="handwritten digits 0-9 (LeCun, Cortes, Burges 1998)",
    source="http://yann.lecun.com/exdb/mnist/",
    classes=tuple(str(i) for i in range(10)),
    files=(
        FileSpec(TRAIN_IMAGES, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9_912_422),
        FileSpec(TRAIN_LABELS, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28_881),
        FileSpec(TEST_IMAGES, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1_648_877),
        FileSpec(TEST_LABELS, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4_542),
    ),
    # The original host has been unreliable for years; the PyTorch and TensorFlow mirrors
    # serve byte-identical archives.
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://yann.lecun.com/exdb/mnist/",
    ),
    system_dirs=("/usr/share/datasets/mnist",),
))

_register(DatasetSpec(
    name="fashion-mnist",
    description="Zalando article images, 10 clothing classes (Xiao, Rasul, Vollgraf 2017)",
    source="https://github.com/zalandoresearch/fashion-mnist",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    files=(
        FileSpec(TRAIN_IMAGES, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26_421_880,
                 "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        FileSpec(TRAIN_LABELS, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29_515,
                 "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        FileSpec(TEST_IMAGES, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4_422_102,
                 "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        FileSpec(TEST_LABELS, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5_148,
                 "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
    mirrors=(
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        "https://fashion-mnist.s3.eu-central-1.amazonaws.com/",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    mirror_symmetric=True,
))

_register(DatasetSpec(
    name="kmnist",
    description="Kuzushiji-MNIST, 10 cursive Japanese hiragana (Clanuwat et al. 2018)",
    source="https://github.com/rois-codh/kmnist",
    classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    files=(
        FileSpec(TRAIN_IMAGES, "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4", 18_165_135),
        FileSpec(TRAIN_LABELS, "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17", 29_497),
        FileSpec(TEST_IMAGES, "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5", 3_041_136),
        FileSpec(TEST_LABELS, "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c", 5_120),
    ),
    mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    system_dirs=("/usr/share/datasets/kmnist",),
))

_register(DatasetSpec(
    name="digits",
    description="scikit-learn's bundled 1,797 8x8 handwritten digits, upsampled to 28x28",
    source="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
    classes=tuple(str(i) for i in range(10)),
    train_count=1_437,
    test_count=360,
))


def get_spec(name: str) -> DatasetSpec:
    """Look a dataset up by name; an unknown name is a UserError listing the known ones."""
    from mnistlab.errors import UserError

    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} "
            "(or --data-dir DIR for any folder holding the four IDX files)"
        ) from None
