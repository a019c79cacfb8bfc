//! The private PostgreSQL cluster the test harness and the demo start when no
//! server answers: started from the installed binaries (as an unprivileged user
//! when we are root), reachable, and stopped cleanly.

use sessiond::pgcluster::PrivateCluster;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

#[tokio::test]
async fn a_private_cluster_starts_answers_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = PrivateCluster::new(&dir.path().join("pg"), free_port())
        .unwrap_or_else(|e| panic!("PostgreSQL server binaries are needed for this test: {e}"));
    cluster.start().unwrap_or_else(|e| panic!("start: {e}"));
    assert!(cluster.is_running());
    let (client, conn) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let one: i32 = client.query_one("SELECT 1", &[]).await.expect("query").get(0);
    assert_eq!(one, 1);
    drop(client);
    cluster.stop().unwrap_or_else(|e| panic!("stop: {e}"));
    assert!(!cluster.is_running());
}
