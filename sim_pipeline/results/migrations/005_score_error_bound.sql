-- Quantised backends (onnx-int8): how far the run's scores are from fp32's, measured on a sample of
-- the run's own pairs scored both ways. NULL for runs at full precision.
ALTER TABLE scoring_runs ADD COLUMN error_bound_pairs INTEGER;            -- pairs scored both ways
ALTER TABLE scoring_runs ADD COLUMN error_bound_max DOUBLE PRECISION;     -- largest |similarity - fp32|
ALTER TABLE scoring_runs ADD COLUMN error_bound_p99 DOUBLE PRECISION;     -- its 99th percentile
