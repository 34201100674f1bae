"""ivf-ondisk: an IVF index whose lists live in a file. Built streamed from vectors, its lists written to a file,
mapped read-only, the changes since kept in RAM, consolidated into a new file.

The folder memory's only index type that need not fit in RAM (memory.Memory decides when to build, save, load and
rewrite, as for every index type; this module does how): IVF with 8-bit scalar-quantized lists (dim bytes + an
8-byte row per document) and an HNSW coarse quantizer over the centroids, the lists in a file beside index.faiss,
index.GENERATION-TOKEN.ivfdata, memory-mapped read-only by every process that opens the memory:
- A lists file is written once and never changed after: by a writer, under the lock, under a name no other file
  had (generation + random token), fsynced before the index.faiss that names it is written (temporary file,
  renamed). index.faiss holds only the centroids and each list's offset and size, and names its lists file by
  its base name (the folder can move); memory.json names it too, with its size, checked before it is mapped.
  The other lists files are removed only after the new index.faiss and memory.json are in place (a process that
  has an older one mapped keeps reading it: the kernel keeps a removed file's pages while they are mapped).
- The changes since the saved index live in RAM, as every index type's do between rewrites: documents added
  since in a small IVF of the same centroids, rows removed since in a set its searches leave out (an IDSelector).
  faiss's OnDiskInvertedLists can add and remove in place, but a saved lists file changed in place would no
  longer be the one its index.faiss and the readers' maps describe, and a writer killed meanwhile would leave
  neither; so adds and removals never touch it. A rewrite (COMPACT, as for every type) writes a new lists file:
  the saved lists and the additions, list by list, without the removed rows: a copy, not a re-encoding.
- A build streams the store: centroids trained on a sample of 40 vectors per list (nlist as ivfpq's), then the
  vectors in batches into parts of ONDISK_PART_BYTES (spilled to temporary part files when there are several),
  written list by list into the lists file; RAM stays at the sample plus one part. It retrains, as ivfpq, once
  the memory has grown 4x since training.
- Search probes IVF_NPROBE lists; Memory.candidates asks the index for ONDISK_RESCORE x k candidates and keeps the
  k best by the exact cosine of the stored float32 vectors (it reads every candidate's vector from the store anyway).
- faiss 1.15's IO_FLAG_MMAP includes IO_FLAG_SKIP_IVF_DATA, so an on-disk index read with it has its lists
  unmapped and crashes when searched (whatever the quantizer); and IO_FLAG_ONDISK_SAME_DIR only works when reading
  from a file name (the memory reads through a checksumming callback). So index.faiss is read with
  IO_FLAG_SKIP_IVF_DATA and the lists file is mapped from the memory folder by name, read-only (PROT_READ).
- A reader that cannot load the saved index, with no writer about to save one, builds it in its own RAM (as for
  every type; at a size larger than RAM that fails, and the next write, or rebuild_index, saves a new pair).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

LISTS_SUFFIX = ".ivfdata"  # a lists file: index.GENERATION-TOKEN.ivfdata
ONDISK_TRAIN_PER_LIST = 40  # the centroids are trained on a sample of this many stored vectors per list
ONDISK_PART_BYTES = 1 << 28  # a build holds at most this much of the lists in RAM at once
ONDISK_QUANTIZER_EF = 64  # efSearch of the HNSW over the centroids (it finds nprobe of them; 64 >= 4 x 16)


def new_index(dim: int, nlist: int, nprobe: int, hnsw_m: int) -> faiss.IndexIVFScalarQuantizer:
    """The empty, untrained IVF of nlist lists that the memory keeps on disk, its lists here in RAM (OnDiskIVF
    wraps it; write_lists writes the lists to their file)."""
    import faiss

    # 8-bit scalar quantization (a quarter of float32; the benchmark's recall@10 0.912 at 10M, 0.949 re-scored);
    # the HNSW over the centroids finds a vector's lists in log time (a flat one costs nlist x dim per vector,
    # which at 65,536 lists is most of a build); k-means itself runs on exact distances
    quantizer = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    quantizer.hnsw.efSearch = ONDISK_QUANTIZER_EF
    base = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                         faiss.METRIC_INNER_PRODUCT)
    base.clustering_index = clustering = faiss.IndexFlatIP(dim)
    base.referenced_objects = [quantizer, clustering]  # kept alive with the index (FAISS holds raw pointers)
    base.cp.niter = 10  # as the benchmark's 10M build: k-means converges for retrieval long before 25
    base.cp.min_points_per_centroid = 1  # no warning for a one-list memory: memory._nlist gives the others >= 39
    base.nprobe = min(nlist, nprobe)
    return base


class OnDiskIVF:
    """An ivf-ondisk memory's index in one process, with the faiss index methods the memory calls (ntotal,
    is_trained, add_with_ids, remove_ids, search).

    base: the IVF that index.faiss holds, its lists memory-mapped read-only from the lists file saved with it (in
    RAM only when it is empty or a reader built it); delta: the same trained IVF, in RAM, holding the rows added
    since (rows above base_through: rows only grow); removed: base rows removed since, which base's searches leave
    out; nprobe: the lists a search probes in each. Nothing here writes a lists file: consolidated() saves
    base + delta - removed as a new one.
    """

    def __init__(self, base: faiss.IndexIVF, base_through: int, nprobe: int, template: np.ndarray | None = None):
        import faiss

        self.base, self.base_through, self.nprobe = base, base_through, nprobe
        self.template = template if template is not None else _empty_template(base)  # the trained, empty IVF
        self.delta = faiss.deserialize_index(self.template)
        self.removed: set[int] = set()
        self._params = None
        self._delta_params = faiss.SearchParametersIVF(nprobe=min(self.delta.nlist, nprobe))

    @property
    def lists(self) -> faiss.OnDiskInvertedLists | None:
        """base's lists file, mapped (None: base's lists are in RAM)."""
        return _ondisk_lists(self.base)

    @property
    def ntotal(self) -> int:
        return self.base.ntotal - len(self.removed) + self.delta.ntotal

    @property
    def is_trained(self) -> bool:
        return self.base.is_trained

    @property
    def changes(self) -> int:
        """Rows added and removed since base."""
        return self.delta.ntotal + len(self.removed)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and ids.min() <= self.base_through:
            raise ValueError(f"row {int(ids.min())} is not above the saved index's {self.base_through}")
        self.delta.add_with_ids(x, ids)

    def remove_ids(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.removed.update(int(r) for r in ids[ids <= self.base_through])
        self.delta.remove_ids(ids[ids > self.base_through])
        self._params = None

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self._params is None:
            params = faiss.SearchParametersIVF(nprobe=min(self.base.nlist, self.nprobe))
            if self.removed:
                inner = faiss.IDSelectorBatch(np.fromiter(self.removed, np.int64, len(self.removed)))
                params.sel = outer = faiss.IDSelectorNot(inner)
                params.referenced_objects = [inner, outer]  # FAISS holds raw pointers
            self._params = params
        scores, rows = self.base.search(x, k, params=self._params)
        if self.delta.ntotal:  # the same centroids and codes: scores comparable with base's
            more, more_rows = self.delta.search(x, k, params=self._delta_params)
            scores, rows = np.hstack([scores, more]), np.hstack([rows, more_rows])
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)
        return scores, rows


def build(index: faiss.IndexIVF, sample: Callable[[int], np.ndarray],
          batches: Iterable[tuple[np.ndarray, np.ndarray]], folder: Path, generation: int, write: bool,
          nprobe: int) -> OnDiskIVF:
    """An OnDiskIVF of every vector, in bounded RAM: `index` (new_index's, untrained) trained on sample(m) (m
    vectors drawn at random, all of them where there are no more: none means no vectors), then `batches` of
    (rows, vectors) in row order added into parts of ONDISK_PART_BYTES, a full part spilled to a temporary file in
    folder; the lists file, FOLDER/index.GENERATION-TOKEN.ivfdata, written from the parts. write False (a reader,
    without the write lock): no file at all, the one part it fills kept in RAM."""
    import faiss

    vectors = sample(ONDISK_TRAIN_PER_LIST * index.nlist)
    if len(vectors):
        index.train(vectors)
    index.clustering_index = None  # training done; the template carries no pointer to it
    template = faiss.serialize_index(index)
    if not len(vectors):
        return OnDiskIVF(index, 0, nprobe, template)
    del vectors
    name = lists_name(generation)
    part_rows = max(1, ONDISK_PART_BYTES // (index.code_size + 8))
    parts, spilled, part, through = [], [], index, 0
    try:
        for rows, vecs in batches:
            part.add_with_ids(vecs, rows)
            through = int(rows[-1])
            if write and part.ntotal >= part_rows:
                spilled.append(folder / f"{name}.part{len(spilled)}")
                faiss.write_index(part, str(spilled[-1]))
                parts.append(faiss.read_index(str(spilled[-1]), faiss.IO_FLAG_MMAP))  # lists mapped, not read
                part = faiss.deserialize_index(template)
        if not write:
            return OnDiskIVF(part, through, nprobe, template)
        base = write_lists(template, [*parts, part] if part.ntotal or not parts else parts, folder / name)
    finally:
        del parts
        for path in spilled:
            path.unlink(missing_ok=True)
    return OnDiskIVF(base, through, nprobe, template)


def consolidated(index: OnDiskIVF, folder: Path, generation: int, rows_through: int) -> OnDiskIVF:
    """index as one that a saved pair can hold: itself where its base's lists file is in place and it has no
    changes, else base + delta - removed copied list by list into a new lists file in folder (codes as they are),
    holding the rows up to rows_through."""
    lists = index.lists
    if not index.changes and (lists is not None or index.base.ntotal == 0) and (
            lists is None or _size_is(Path(lists.filename), lists.totsize)):
        return index
    base = write_lists(index.template, [index.base, index.delta], folder / lists_name(generation),
                       removed=np.array(sorted(index.removed), np.int64))
    return OnDiskIVF(base, rows_through, index.nprobe, index.template)


def write_lists(template: np.ndarray, sources: list, path: Path,
                removed: np.ndarray | None = None) -> faiss.IndexIVF:
    """A new lists file at path of the sources' lists concatenated list by list (compact: each list holds its
    codes then its rows), less the removed rows, fsynced; the template's IVF over it, mapped read-only. (faiss's
    own merge_from_multiple does the same, less the filter, and prints to stdout.)"""
    import faiss

    base = faiss.deserialize_index(template)
    nlist, code_size = base.nlist, base.code_size
    invlists = [s.invlists for s in sources]
    sizes = np.zeros(nlist, np.uint64)
    with open(path, "wb") as f:
        for j in range(nlist):
            codes, ids = [], []
            for lists in invlists:
                m = lists.list_size(j)
                if not m:
                    continue
                c = faiss.rev_swig_ptr(lists.get_codes(j), m * code_size).reshape(m, code_size)
                i = faiss.rev_swig_ptr(lists.get_ids(j), m)
                if removed is not None and len(removed):
                    keep = ~_isin_sorted(i, removed)
                    c, i = c[keep], i[keep]
                codes.append(c)
                ids.append(i)
            if codes:
                sizes[j] = sum(len(i) for i in ids)
                for c in codes:
                    f.write(np.ascontiguousarray(c).data)
                for i in ids:
                    f.write(np.ascontiguousarray(i, dtype=np.int64).data)
        f.flush()
        os.fsync(f.fileno())
    total = int(sizes.sum())
    if not total:  # nothing to map (a zero-length map fails): the empty lists stay in RAM
        path.unlink()
        return base
    lists = faiss.OnDiskInvertedLists(nlist, code_size, str(path))
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    lists.totsize = total * (code_size + 8)
    _map(lists, path)
    base.replace_invlists(lists, True)
    lists.this.disown()
    base.ntotal = total
    faiss.downcast_index(base.quantizer).hnsw.efSearch = ONDISK_QUANTIZER_EF
    return base


def mapped(header: bytes, folder: Path, name: str | None, size: int | None, rows_through: int,
           nprobe: int) -> OnDiskIVF:
    """The OnDiskIVF of a saved index.faiss (its bytes, read without its lists) whose lists file, FOLDER/name
    (memory.json's; None: index.faiss holds its lists, empty), of `size` bytes, is mapped read-only;
    ValueError where the pair does not match (another name, or a size that is not the one written), RuntimeError
    where FAISS cannot read or map it."""
    import faiss

    flags = faiss.IO_FLAG_SKIP_IVF_DATA if name else 0
    index = faiss.deserialize_index(np.frombuffer(header, np.uint8), flags)
    lists = _ondisk_lists(index)
    if name:
        if lists is None or lists.filename != name or Path(name).name != name:
            raise ValueError(f"index.faiss names lists {lists.filename if lists else None!r}, not {name!r}")
        path = folder / name
        if not (path.stat().st_size == lists.totsize == size):
            raise ValueError(f"{path}: not the size written")
        _map(lists, path)
    elif lists is not None:
        raise ValueError("index.faiss names a lists file that memory.json does not")
    faiss.downcast_index(index.quantizer).hnsw.efSearch = ONDISK_QUANTIZER_EF
    return OnDiskIVF(index, rows_through, nprobe)


@contextmanager
def lists_named(index, name: str | None) -> Iterator[None]:
    """While index.faiss is written: its lists file named by its base name alone, so the saved index finds its
    lists wherever the folder is (the mapped file's full path is kept in RAM)."""
    lists = _ondisk_lists(index) if name else None
    if lists is None:
        yield
        return
    full, lists.filename = lists.filename, name
    try:
        yield
    finally:
        lists.filename = full


def remove_stale_lists(folder: Path, keep: str | None) -> None:
    """Every lists file and part file of the folder but `keep` (the one index.faiss now names): older ones, and
    those of writers killed before saving theirs. Only after the new index.faiss and memory.json are in place; a
    process that has one mapped keeps reading it."""
    for path in folder.iterdir():
        if path.name != keep and path.name.startswith("index.") and (
                path.name.endswith(LISTS_SUFFIX) or LISTS_SUFFIX + ".part" in path.name):
            path.unlink(missing_ok=True)


def lists_name(generation: int) -> str:
    """A name for a new lists file that no file of the folder has had: the generation, and a random token."""
    return f"index.{generation}-{os.urandom(6).hex()}{LISTS_SUFFIX}"


def _ondisk_lists(index: faiss.IndexIVF) -> faiss.OnDiskInvertedLists | None:
    import faiss

    lists = faiss.downcast_InvertedLists(index.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _map(lists: faiss.OnDiskInvertedLists, path: Path) -> None:
    """Map the lists file read-only (opened "r", PROT_READ: no process can write it through the map), with no
    prefetch threads (FAISS starts up to 32 per search to read the probed lists ahead: 0.9 ms of a 1 ms search of
    lists in the page cache; without them the search thread reads the pages it touches itself)."""
    lists.filename, lists.read_only, lists.prefetch_nthread = str(path), True, 0
    lists.do_mmap()


def _empty_template(index: faiss.IndexIVF) -> np.ndarray:
    """The trained IVF with no vectors, serialized: what delta and a rewritten base start from. (index's lists on
    disk are not read: its header is copied and given empty lists in RAM.)"""
    import faiss

    data = faiss.serialize_index(index)
    if _ondisk_lists(index) is None:
        if index.ntotal:
            raise ValueError("an in-RAM ivf-ondisk index with vectors needs its template")
        return data
    empty = faiss.deserialize_index(data, faiss.IO_FLAG_SKIP_IVF_DATA)  # the lists file is not mapped
    lists = faiss.ArrayInvertedLists(empty.nlist, empty.code_size)
    empty.replace_invlists(lists, True)
    lists.this.disown()
    empty.ntotal = 0
    return faiss.serialize_index(empty)


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _size_is(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
