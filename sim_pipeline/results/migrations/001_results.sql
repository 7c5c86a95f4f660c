-- Results of scoring runs. Plain DDL that PostgreSQL (production) and SQLite (embedded) both accept.
-- Applied once, in file-name order, by sim_pipeline.results.db and recorded in schema_migrations.

CREATE TABLE IF NOT EXISTS scoring_runs (
    run_id      TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    model       TEXT NOT NULL,
    started_at  TIMESTAMP WITH TIME ZONE NOT NULL,
    finished_at TIMESTAMP WITH TIME ZONE,
    status      TEXT NOT NULL,          -- running | succeeded | failed
    rows_total  BIGINT,
    rows_ok     BIGINT,
    rows_error  BIGINT
);

CREATE TABLE IF NOT EXISTS similarity_scores (
    run_id       TEXT NOT NULL REFERENCES scoring_runs (run_id) ON DELETE CASCADE,
    row_number   BIGINT NOT NULL,       -- 0-based data row of the input file
    image_url    TEXT NOT NULL,
    url_hash     TEXT,                  -- sha256 hex of the URL; NULL when the URL was empty
    caption      TEXT NOT NULL,
    caption_hash TEXT NOT NULL,         -- sha256 hex of the caption
    model        TEXT NOT NULL,
    similarity   DOUBLE PRECISION,      -- (cosine + 1) / 2, rounded to 4 decimals; NULL on error
    cosine       DOUBLE PRECISION,      -- raw cosine of the two embeddings; NULL on error
    error        TEXT,                  -- error code; NULL on success
    scored_at    TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (run_id, row_number),
    CHECK ((similarity IS NULL) <> (error IS NULL))
);

CREATE INDEX IF NOT EXISTS similarity_scores_url_hash ON similarity_scores (url_hash);
CREATE INDEX IF NOT EXISTS similarity_scores_caption_model ON similarity_scores (caption_hash, model);
CREATE INDEX IF NOT EXISTS similarity_scores_scored_at ON similarity_scores (scored_at);
