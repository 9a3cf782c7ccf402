"""The bench's figures for the work outside the models: per face at a 512 px crop with every pass
off, and what detecting each face again in its crop would cost and move."""

from __future__ import annotations

from easyphoto.server.face_bench import CLASSICAL_TARGET_MS, classical_lines, classical_work


def test_the_classical_work_is_timed_per_face_and_the_carried_landmarks_found_again() -> None:
    work = classical_work(repeats=1)
    assert 0 < work.ms_per_face < 100 * CLASSICAL_TARGET_MS  # a time per face, not per request or run
    assert work.redetect_ms_per_face > 0
    # MTCNN in the crop finds the face the landmarks were carried onto, within a few pixels (another
    # face of the group photo would be over a hundred away).
    assert 0 <= work.carried_vs_redetected_px < 24
    text = " ".join(classical_lines(work))
    assert f"**{work.ms_per_face:.1f} ms** a face (target at most {CLASSICAL_TARGET_MS} ms)" in text
