//! Transaction latency of a raw transactional rdkafka producer on the test
//! broker, with three sets of client settings (a diagnostic probe for the
//! event log's figures; `cargo run -p smartmsg-kafka --example raw --
//! VARIANT rotate|fixed` with `SMARTMSG_KAFKA_BOOTSTRAP` set).
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
#[derive(Clone, Default)]
struct Count(Arc<Mutex<u64>>);
impl ClientContext for Count {}
impl ProducerContext for Count {
    type DeliveryOpaque = ();
    fn delivery(&self, _r: &DeliveryResult<'_>, _: ()) {
        *self.0.lock().unwrap() += 1;
    }
}
fn main() {
    let bs = std::env::var("SMARTMSG_KAFKA_BOOTSTRAP").unwrap();
    let variant: u32 = std::env::args().nth(1).unwrap().parse().unwrap();
    let rotate: bool = std::env::args().nth(2).unwrap() == "rotate";
    let topic = format!("rawlat-{}-{variant}", std::process::id());
    let count = Count::default();
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &bs)
        .set("transactional.id", &topic)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0");
    if variant >= 1 {
        c.set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", "30000");
    }
    if variant >= 2 {
        c.set("socket.timeout.ms", "30000")
            .set("client.id", "x")
            .set("message.max.bytes", "1114112");
    }
    let p: BaseProducer<Count> = c.create_with_context(count.clone()).unwrap();
    p.init_transactions(Duration::from_secs(30)).unwrap();
    let payload = vec![0u8; 100];
    let t0 = Instant::now();
    let mut lat = vec![];
    for n in 0..300u64 {
        let t = Instant::now();
        p.begin_transaction().unwrap();
        p.send(
            BaseRecord::to(&topic)
                .key("k")
                .payload(&payload)
                .partition(if rotate { (n % 4) as i32 } else { 0 }),
        )
        .map_err(|(e, _)| e)
        .unwrap();
        while *count.0.lock().unwrap() < n + 1 {
            p.poll(Duration::from_millis(1));
        }
        p.commit_transaction(Duration::from_secs(30)).unwrap();
        lat.push(t.elapsed().as_micros());
    }
    lat.sort();
    println!(
        "variant {variant} rotate {rotate}: {:.0}/s p50 {} p90 {}",
        300.0 / t0.elapsed().as_secs_f64(),
        lat[150],
        lat[270]
    );
}
