-- Nightly drift: each comparison of a run's scores with another run's (`sim-pipeline results
-- drift`, the report's drift section, the score_drift DAG), and the canary pairs scored with every
-- run. Plain DDL that PostgreSQL and SQLite both accept; new tables only, so a 003 database
-- upgrades in place.

-- One comparison per (run, against): recomputing it replaces the row. The figures are columns, so
-- people query them; error_shares and canaries are JSON text (a row per code would be noise).
CREATE TABLE IF NOT EXISTS score_drift (
    run_id            TEXT NOT NULL,
    against_run_id    TEXT NOT NULL,    -- the reference: the previous run of the input, or pinned
    verdict           TEXT NOT NULL,    -- stable | watch | alert
    reasons           TEXT NOT NULL,    -- JSON array of sentences: why watch or alert
    psi               DOUBLE PRECISION, -- population stability index, 10 bins at the reference's deciles
    ks_statistic      DOUBLE PRECISION, -- two-sample Kolmogorov-Smirnov D
    ks_pvalue         DOUBLE PRECISION,
    wasserstein       DOUBLE PRECISION, -- earth mover's distance over the reference's std
    cutoff            DOUBLE PRECISION, -- the similarity the two shares below are counted above
    share_above       DOUBLE PRECISION,
    against_share_above DOUBLE PRECISION,
    scored_rows       BIGINT,
    against_scored_rows BIGINT,
    error_shares      TEXT NOT NULL,    -- JSON {code: [share in run, share in against]}
    canaries          TEXT,             -- JSON: the canary verdict, NULL when neither has canaries
    computed_at       TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (run_id, against_run_id)
);

-- The canary pairs (SIM_PIPELINE_CANARY_CSV) as scored with a run, and what scored them: a score
-- that moves between two runs means the model or the preprocessing changed, not the data.
CREATE TABLE IF NOT EXISTS canary_scores (
    run_id        TEXT NOT NULL,
    row_number    BIGINT NOT NULL,      -- 0-based data row of the canary file
    image_url     TEXT NOT NULL,
    caption       TEXT NOT NULL,
    similarity    DOUBLE PRECISION,     -- NULL on error
    error         TEXT,
    model         TEXT NOT NULL,
    model_precision TEXT NOT NULL,
    model_backend TEXT NOT NULL,
    PRIMARY KEY (run_id, row_number)
);
