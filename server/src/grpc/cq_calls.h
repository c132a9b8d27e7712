#ifndef TB_GRPC_CQ_CALLS_H_
#define TB_GRPC_CQ_CALLS_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "server/src/common/mutex.h"

// Every service the broker serves runs on gRPC's completion-queue async model, with one CQ and
// one thread per core. gRPC 1.51's callback API, although simpler to write against, makes the
// whole process poll with two extra `nexting_thread`s as soon as one callback method exists on
// any server; on 2 cores they took about a quarter of the broker's CPU under GetToken load. The
// classes here give unary and server-streaming methods the callback API's shape (a reply that
// is finished once from any thread; a write reactor with OnWriteDone, OnCancel and OnDone) on
// top of the CQ model, so that the services keep that simple shape without its threads.
namespace tb::grpc_api::cq {

// What a completion-queue event resumes: the tag handed to gRPC.
class Tag {
 public:
  virtual void Run(bool ok) = 0;

 protected:
  ~Tag() = default;
};

// One server's completion queues, a thread for each, and a count of the call objects that still
// have a tag with gRPC: from the moment a call is requested (armed) until the object is deleted
// on its queue's thread. A call that gRPC has delivered but no thread has picked up yet still
// counts, so a queue is never shut down under a call that would then request its successor or
// start its Finish on it (gRPC aborts on either).
//
// Lifecycle: AddTo(builder) before BuildAndStart; OnStart(arm) for each method; Start() after
// BuildAndStart; Shutdown() after the server's Shutdown(). The queues are freed with this
// object, which must therefore outlive the grpc::Server.
class Queues {
 public:
  // `name` names the threads ("<name>-<i>", at most 15 characters), for top and perf.
  //
  // `look_every` zero: each thread waits in Next() and so takes its turn at polling the
  // process's one epoll set, doing the transport work of every server. Not zero: each thread
  // takes what is ready every `look_every` and sleeps in between, never waiting in gRPC, so it
  // stays out of that rotation; events wait up to `look_every`. For a quiet server beside a busy
  // one (the probe port, whose waiting thread took 14% of the broker's CPU under GetToken load).
  explicit Queues(std::string name, absl::Duration look_every = absl::ZeroDuration())
      : name_(std::move(name)), look_every_(look_every) {}
  Queues(const Queues&) = delete;
  Queues& operator=(const Queues&) = delete;
  ~Queues();

  void AddTo(grpc::ServerBuilder& builder, int count);
  // `arm` requests a method's first calls on one queue; Start runs it for every queue.
  void OnStart(std::function<void(grpc::ServerCompletionQueue*)> arm);
  void Start();
  // Waits until every call object is gone (after the server's Shutdown every armed request
  // comes back failed; the domain answers the calls it holds, and GetToken's waiting calls and
  // the open streams are answered before that Shutdown), then shuts the queues down, drains
  // them and joins the threads. Idempotent.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  // A call object is about to be requested on one of these queues / was deleted on its queue's
  // thread.
  void CallArmed() ABSL_LOCKS_EXCLUDED(mu_);
  void CallDeleted() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  static void Drive(grpc::ServerCompletionQueue* cq);
  static void Look(grpc::ServerCompletionQueue* cq, absl::Duration every);

  const std::string name_;
  const absl::Duration look_every_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs_;
  std::vector<std::function<void(grpc::ServerCompletionQueue*)>> arms_;
  std::vector<std::thread> threads_;
  bool shut_down_ = false;  // Shutdown is called from one thread at a time

  Mutex mu_;
  CondVar idle_;
  size_t calls_ ABSL_GUARDED_BY(mu_) = 0;
};

// How a unary handler answers: Finish once, from any thread. The request and response the
// handler got stay valid until then.
class UnaryReply {
 public:
  virtual void Finish(const grpc::Status& status) = 0;

 protected:
  ~UnaryReply() = default;
};

// A unary method served on the CQs: what requests its calls and what handles them.
template <class Service, class Req, class Resp>
struct UnaryMethod {
  using RequestFn = void (Service::*)(grpc::ServerContext*, Req*,
                                      grpc::ServerAsyncResponseWriter<Resp>*,
                                      grpc::CompletionQueue*, grpc::ServerCompletionQueue*, void*);
  using Handler = std::function<void(grpc::ServerContext*, const Req*, Resp*, UnaryReply*)>;

  Service* service;
  RequestFn request;
  Handler handler;
  Queues* queues;
  int armed_per_queue = 4;  // requests kept waiting for new calls on each queue
};

// One call of a UnaryMethod. The CQ thread owns it: it is deleted when its Finish (or a failed
// request, at shutdown) comes back. Each queue has one thread, so that cannot happen while the
// handler still runs on it.
template <class Service, class Req, class Resp>
class UnaryCall final : public Tag, public UnaryReply {
 public:
  using Method = UnaryMethod<Service, Req, Resp>;

  // Keeps `m->armed_per_queue` requests waiting on `cq`; `m` must outlive the server.
  static void Arm(const Method* m, grpc::ServerCompletionQueue* cq) {
    for (int i = 0; i < m->armed_per_queue; ++i) {
      new UnaryCall(m, cq);
    }
  }

  void Run(bool ok) override {
    if (!ok || started_) {
      Queues* const queues = m_->queues;
      delete this;  // the answer went out, or the server is shutting down
      queues->CallDeleted();
      return;
    }
    started_ = true;
    new UnaryCall(m_, cq_);                   // the next caller finds a request waiting
    m_->handler(&ctx_, &req_, &resp_, this);  // may finish from another thread at once
  }

  void Finish(const grpc::Status& status) override {
    if (status.ok()) {
      responder_.Finish(resp_, status, this);
    } else {
      responder_.FinishWithError(status, this);
    }
  }

 private:
  UnaryCall(const Method* m, grpc::ServerCompletionQueue* cq) : m_(m), cq_(cq), responder_(&ctx_) {
    m_->queues->CallArmed();
    (m_->service->*m_->request)(&ctx_, &req_, &responder_, cq_, cq_, this);
  }

  const Method* const m_;
  grpc::ServerCompletionQueue* const cq_;
  grpc::ServerContext ctx_;
  Req req_;
  Resp resp_;
  grpc::ServerAsyncResponseWriter<Resp> responder_;
  bool started_ = false;
};

template <class Resp>
class ServerStream;

// The callback API's ServerWriteReactor, on a CQ stream. One write in flight at a time; Finish
// once, also after OnCancel (the stream is not over before), allowed with a write in flight
// (the stream starts it when the write completes: gRPC's async writer takes no Finish beside a
// write); nothing after Finish. StartWrite and Finish may be called from any thread and never run a
// reaction inline, so a reactor may call them under its own lock, which it must do when another
// thread may call Finish meanwhile (or the stream may be over before the write starts). The
// On* reactions run on the stream's CQ thread, never two at once. OnDone comes last, when
// Finish has completed and no write is in flight; the stream is freed after it returns.
template <class Resp>
class WriteReactor {
 public:
  explicit WriteReactor(ServerStream<Resp>* stream) : stream_(stream) {}
  virtual ~WriteReactor() = default;

  void StartWrite(const Resp* msg) { stream_->Write(msg); }
  void Finish(const grpc::Status& status) { stream_->Finish(status); }

  virtual void OnWriteDone(bool ok) = 0;
  virtual void OnCancel() = 0;
  virtual void OnDone() = 0;

 private:
  ServerStream<Resp>* const stream_;
};

// What a streaming call's reactor writes through.
template <class Resp>
class ServerStream {
 public:
  virtual void Write(const Resp* msg) = 0;
  virtual void Finish(const grpc::Status& status) = 0;

 protected:
  ~ServerStream() = default;
};

// A server-streaming method served on the CQs. The handler builds the call's reactor with the
// stream it is given and returns it; it may write or finish at once.
template <class Service, class Req, class Resp>
struct StreamMethod {
  using RequestFn = void (Service::*)(grpc::ServerContext*, Req*, grpc::ServerAsyncWriter<Resp>*,
                                      grpc::CompletionQueue*, grpc::ServerCompletionQueue*, void*);
  using Handler =
      std::function<WriteReactor<Resp>*(grpc::ServerContext*, const Req*, ServerStream<Resp>*)>;

  Service* service;
  RequestFn request;
  Handler handler;
  Queues* queues;
  int armed_per_queue = 4;
};

// One call of a StreamMethod. Four events: the call arrives, a write completes, Finish
// completes, and the call is done (AsyncNotifyWhenDone: finished or cancelled). It is deleted
// after the reactor's OnDone.
template <class Service, class Req, class Resp>
class StreamCall final : public ServerStream<Resp> {
 public:
  using Method = StreamMethod<Service, Req, Resp>;

  static void Arm(const Method* m, grpc::ServerCompletionQueue* cq) {
    for (int i = 0; i < m->armed_per_queue; ++i) {
      new StreamCall(m, cq);
    }
  }

  void Write(const Resp* msg) override {
    {
      MutexLock lock(&mu_);
      writing_ = true;
    }
    writer_.Write(*msg, &write_done_);
  }

  void Finish(const grpc::Status& status) override {
    {
      MutexLock lock(&mu_);
      if (writing_) {
        deferred_finish_ = status;  // OnWriteDone starts it
        return;
      }
    }
    writer_.Finish(status, &finish_done_);
  }

 private:
  // Routes one kind of event to its member function.
  class Event final : public Tag {
   public:
    Event(StreamCall* call, void (StreamCall::*on)(bool)) : call_(call), on_(on) {}
    void Run(bool ok) override { (call_->*on_)(ok); }

   private:
    StreamCall* const call_;
    void (StreamCall::*const on_)(bool);
  };

  StreamCall(const Method* m, grpc::ServerCompletionQueue* cq)
      : m_(m),
        cq_(cq),
        writer_(&ctx_),
        arrived_(this, &StreamCall::OnArrived),
        write_done_(this, &StreamCall::OnWriteDone),
        finish_done_(this, &StreamCall::OnFinishDone),
        call_done_(this, &StreamCall::OnCallDone) {
    m_->queues->CallArmed();
    ctx_.AsyncNotifyWhenDone(&call_done_);  // delivered only once the call has started
    (m_->service->*m_->request)(&ctx_, &req_, &writer_, cq_, cq_, &arrived_);
  }

  void OnArrived(bool ok) {
    if (!ok) {
      Delete();  // the server is shutting down; the call never started
      return;
    }
    new StreamCall(m_, cq_);
    reactor_ = m_->handler(&ctx_, &req_, this);
  }

  void OnWriteDone(bool ok) {
    std::optional<grpc::Status> finish;
    {
      MutexLock lock(&mu_);
      writing_ = false;
      finish.swap(deferred_finish_);
    }
    if (finish) {
      writer_.Finish(*finish, &finish_done_);
    }
    reactor_->OnWriteDone(ok);
    MaybeDone();
  }

  void OnFinishDone(bool) {
    {
      MutexLock lock(&mu_);
      finished_ = true;
    }
    MaybeDone();
  }

  void OnCallDone(bool) {
    {
      MutexLock lock(&mu_);
      call_done_seen_ = true;
    }
    if (ctx_.IsCancelled()) {
      reactor_->OnCancel();
    }
    MaybeDone();
  }

  // Every event runs on the CQ's one thread, so once this decides, no other event is pending.
  void MaybeDone() {
    {
      MutexLock lock(&mu_);
      if (!finished_ || !call_done_seen_ || writing_) {
        return;
      }
    }
    reactor_->OnDone();
    Delete();
  }

  void Delete() {
    Queues* const queues = m_->queues;
    delete this;
    queues->CallDeleted();
  }

  const Method* const m_;
  grpc::ServerCompletionQueue* const cq_;
  grpc::ServerContext ctx_;
  Req req_;
  grpc::ServerAsyncWriter<Resp> writer_;
  WriteReactor<Resp>* reactor_ = nullptr;  // set before any event but the arrival runs
  Event arrived_;
  Event write_done_;
  Event finish_done_;
  Event call_done_;

  Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> deferred_finish_ ABSL_GUARDED_BY(mu_);  // Finish during a write
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool call_done_seen_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tb::grpc_api::cq

#endif  // TB_GRPC_CQ_CALLS_H_
