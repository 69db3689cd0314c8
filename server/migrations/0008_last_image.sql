-- The still a first-last-frame job ends on, base64 as submitted (as `image`):
-- kept out of the job's fields like the first still.
ALTER TABLE jobs ADD COLUMN last_image TEXT;
