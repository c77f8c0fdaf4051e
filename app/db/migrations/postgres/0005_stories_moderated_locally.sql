-- Whether the local word list, not OpenAI's moderation, passed the prompt or the
-- story text: NULL for stories written before content checks existed.
ALTER TABLE stories ADD COLUMN IF NOT EXISTS moderated_locally BOOLEAN;
