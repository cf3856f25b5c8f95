"""Welding and topology for the cleanup stage.

Viewers weld coincident vertices on load (trimesh's ``load(..., process=True)``, MeshLab,
Blender), so a mesh that is closed and two-manifold by index can turn non-manifold once two
distinct vertices at one position merge. Cleanup therefore welds first, repairs the welded
mesh without ever splitting a vertex into coincident copies (``make_manifold``), and measures
its topology on the welded mesh (``topology``), which is what a viewer sees.

Welding is trimesh's ``merge_vertices`` on the positions as the PLY stores them (float32):
exactly the merge a ``process=True`` load of ``mesh.ply`` or ``mesh.obj`` does.
"""
from __future__ import annotations

import numpy as np

REPAIR_ROUNDS = 8  # removing the faces of a non-manifold edge or vertex can expose another


def components(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Connected-component label per face (faces sharing a vertex are connected)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n = len(vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = sp.coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels[faces[:, 0]]


def welded_trimesh(vertices: np.ndarray, faces: np.ndarray):
    """The mesh a ``process=True`` load of the saved file gives: float32 positions, coincident
    vertices merged (positions only: normals and UVs do not keep copies apart)."""
    import trimesh

    stored = np.asarray(vertices, np.float32).astype(np.float64)
    m = trimesh.Trimesh(stored, np.asarray(faces, np.int64), process=False)
    m.merge_vertices(merge_tex=True, merge_norm=True)
    return m


def weld(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Weld coincident vertices (``welded_trimesh``), then drop the faces that collapse (two
    corners merged) or coincide and the vertices left unreferenced. Returns vertices, faces
    and the number of vertices merged away."""
    m = welded_trimesh(vertices, faces)
    merged = len(np.unique(faces)) - len(m.vertices)
    f = m.faces
    collapsed = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 2] == f[:, 0])
    m.update_faces(m.unique_faces() & ~collapsed)
    m.remove_unreferenced_vertices()
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64), int(merged)


def make_manifold(ms, rounds: int = REPAIR_ROUNDS) -> int:
    """Make the current mesh of pymeshlab MeshSet ``ms`` two-manifold by removing faces: those
    pymeshlab's edge repair picks at non-manifold edges, and all faces around a non-manifold
    vertex. Vertices are never split (a split leaves coincident copies that a weld on load
    merges back). The holes this opens are left to hole closing. Returns the faces removed."""
    start = ms.current_mesh().face_number()
    for _ in range(rounds):
        t = ms.get_topological_measures()
        if t["non_two_manifold_edges"] == 0 and t["non_two_manifold_vertices"] == 0:
            break
        ms.meshing_repair_non_manifold_edges(method="Remove Faces")
        ms.compute_selection_by_non_manifold_per_vertex()  # selects their faces too
        if ms.current_mesh().selected_face_number():
            ms.meshing_remove_selected_vertices_and_faces()
        ms.set_selection_none()
        ms.meshing_remove_unreferenced_vertices()
    return start - ms.current_mesh().face_number()


def non_manifold_vertices(vertices: np.ndarray, faces: np.ndarray) -> int:
    """Vertices whose faces form more than one fan (pymeshlab), of the mesh as indexed."""
    import pymeshlab

    if len(faces) == 0:
        return 0
    ms = pymeshlab.MeshSet()
    ms.add_mesh(pymeshlab.Mesh(vertex_matrix=vertices, face_matrix=faces.astype(np.int32)))
    return int(ms.get_topological_measures()["non_two_manifold_vertices"])


def topology(vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Watertightness, components, boundary loops, non-manifold edges and vertices, Euler
    characteristic, genus, volume and area of the WELDED mesh (``welded_trimesh``)."""
    m = welded_trimesh(vertices, faces)
    v, f = np.asarray(m.vertices), np.asarray(m.faces, np.int64)
    edges = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    uniq, counts = np.unique(edges, axis=0, return_counts=True)
    n_comp = len(np.unique(components(v, f))) if len(f) else 0
    boundary = uniq[counts == 1]
    loops = len(np.unique(components(v, np.c_[boundary, boundary[:, :1]]))) if len(boundary) else 0
    euler = len(np.unique(f)) - len(uniq) + len(f)
    bad_edges, bad_vertices = int((counts > 2).sum()), non_manifold_vertices(v, f)
    manifold = bad_edges == 0 and bad_vertices == 0
    return {"watertight": bool(m.is_watertight), "components": n_comp, "boundary_loops": loops,
            "manifold_edges": bad_edges == 0, "non_manifold_edges": bad_edges,
            "non_manifold_vertices": bad_vertices, "manifold": manifold, "euler_characteristic": int(euler),
            "genus": int((2 * n_comp - loops - euler) // 2) if manifold else None,
            "volume": float(m.volume) if m.is_watertight else None, "area": float(m.area),
            "welded_vertices": len(v)}
