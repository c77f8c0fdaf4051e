-- A claim on an Idempotency-Key is a short lease: its holder renews
-- locked_until while its request runs, and a claim whose lease lapsed (its
-- worker died) is taken over by the next request with the same fingerprint.
-- claim_token is a random token per claim, unchanged by renewals: the holder's
-- story write, renewals and release all require it, so a request whose claim
-- was taken over changes nothing. Null for claims made before this migration.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS claim_token TEXT;
