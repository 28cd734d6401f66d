-- The W3C trace context of the publication an e-mail comes from (issue 15: the mailer's
-- send is a span of the request's trace). NULL when traces are not exported.
ALTER TABLE email_outbox ADD COLUMN trace text;
