-- The query side: what export, report and stale-run detection need, the indexes the common queries
-- use, and the newest score per (image, caption, model). Upgrades a 001 database in place: every
-- new column is nullable, so existing rows stay as they are.

-- The input file's layout, so `results export` can rebuild the scored CSV from the database alone.
ALTER TABLE scoring_runs ADD COLUMN input_columns TEXT;      -- JSON array: the input's header
ALTER TABLE scoring_runs ADD COLUMN input_delimiter TEXT;    -- ',' or a tab
-- Heartbeat: bumped by every chunk written and every stage finished. A run still 'running' with
-- no heartbeat for a while died without closing (killed pod, lost machine): shown as stale.
ALTER TABLE scoring_runs ADD COLUMN updated_at TIMESTAMP WITH TIME ZONE;

ALTER TABLE similarity_scores ADD COLUMN input_fields TEXT;  -- JSON array: the row's input values

-- How long each stage took, per chunk (chunk -1: stages that run once per run, plan and finalize).
CREATE TABLE IF NOT EXISTS stage_timings (
    run_id      TEXT NOT NULL,
    stage       TEXT NOT NULL,
    chunk       INTEGER NOT NULL,
    seconds     DOUBLE PRECISION NOT NULL,
    finished_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (run_id, stage, chunk)
);

-- The common queries and their indexes: a run's rows, the primary key (run_id, row_number); an
-- image, similarity_scores_url_hash (001); a caption and model, similarity_scores_caption_model
-- (001); a time range, similarity_scores_scored_at (001); the newest runs, this one. Each index
-- costs every chunk write, so there is no wider one for the view below: an image or a caption has
-- few rows, and sorting them per query is cheap.
CREATE INDEX IF NOT EXISTS scoring_runs_started_at ON scoring_runs (started_at);

-- The newest result (score or error) for each image URL, caption and model, across all runs.
DROP VIEW IF EXISTS latest_similarity_scores;
CREATE VIEW latest_similarity_scores AS
SELECT run_id, row_number, image_url, url_hash, caption, caption_hash, model,
       similarity, cosine, error, scored_at
FROM (
    SELECT s.*, ROW_NUMBER() OVER (
        PARTITION BY url_hash, caption_hash, model
        ORDER BY scored_at DESC, run_id DESC, row_number DESC) AS newest
    FROM similarity_scores s
) ranked
WHERE newest = 1;
