-- PostgreSQL only. The foreign key from similarity_scores to scoring_runs checked every row of
-- every chunk, one lookup per row: half the cost of a chunk write. Writers keep the invariant
-- instead: a run's row in scoring_runs is written before its scores (start_run), and
-- `sim-pipeline results prune` deletes a run's scores with it. (SQLite never enforced it.)
-- Deleting a run by hand: DELETE FROM similarity_scores WHERE run_id = ... first.
ALTER TABLE similarity_scores DROP CONSTRAINT IF EXISTS similarity_scores_run_id_fkey;
