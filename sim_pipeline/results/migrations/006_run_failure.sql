-- A failed run's one sentence (what failed, what to do), as its command or task ended with it;
-- NULL for runs that did not fail, and for runs failed before this column existed.
ALTER TABLE scoring_runs ADD COLUMN failure TEXT;
