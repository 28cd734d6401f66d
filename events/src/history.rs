//! Earlier versions of event schemas stay readable: each historical `.avsc` in
//! `avro/history/` is kept, and a test decodes a sample written with it through today's
//! reader schema (Avro schema resolution fills the fields added since with their
//! defaults, so no upcaster is needed yet).

#[cfg(test)]
mod tests {
    use apache_avro::Schema;
    use apache_avro::types::{Record, Value};
    use apache_avro::writer::datum::GenericDatumWriter;
    use uuid::Uuid;

    use crate::reads::ReadEvent;
    use crate::schemas::schema_of;
    use crate::wire;

    #[test]
    fn a_read_recorded_with_schema_version_1_is_read_with_today_s_schema() {
        let v1 = Schema::parse_str(include_str!(
            "../../avro/history/newsroom.reads.NewsRead.v1.avsc"
        ))
        .expect("the v1 schema parses");
        let Schema::Record(record) = &v1 else {
            panic!("a record schema")
        };
        let (reader, news) = (Uuid::now_v7(), Uuid::now_v7());
        let mut meta = Record::new(&record.fields[0].schema).expect("metadata record");
        meta.put("event_id", Value::Uuid(Uuid::now_v7()));
        meta.put("aggregate_id", Value::Uuid(reader));
        meta.put("aggregate_version", Value::Long(0));
        meta.put("occurred_at", Value::TimestampMicros(1_764_000_000_000_000));
        meta.put("correlation_id", Value::String("request".into()));
        meta.put("causation_id", Value::String("request".into()));
        meta.put("actor_id", Value::Union(1, Box::new(Value::Uuid(reader))));
        meta.put("schema_version", Value::Int(1));
        let mut sample = Record::new(&v1).expect("read record");
        sample.put("metadata", meta);
        sample.put("news_id", Value::Uuid(news));
        let body = GenericDatumWriter::builder(&v1)
            .build()
            .and_then(|w| w.write_value_to_vec(sample))
            .expect("a v1 sample encodes");

        let today = schema_of("newsroom.reads.NewsRead").expect("today's schema");
        let value = wire::decode(&v1, today, &body).expect("resolves to today's schema");
        let body_reader = wire::BodyReader::new(v1.clone(), today).expect("a body reader");
        assert!(body_reader.resolves());
        let read_once = body_reader
            .read(&body)
            .expect("a body reader resolves it too");
        assert_eq!(
            read_once, value,
            "a body reader resolves an older writer schema"
        );
        let ReadEvent::Read(read) =
            ReadEvent::from_avro("newsroom.reads.NewsRead", value).expect("decodes");
        assert_eq!((read.metadata.aggregate_id, read.news_id), (reader, news));
        assert_eq!(
            (read.category, read.tags),
            (None, None),
            "fields added since v1"
        );
    }
}
