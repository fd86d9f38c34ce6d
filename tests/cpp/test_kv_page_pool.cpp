// Tests of the KV page pool: tensor shape, allocation/free, all-or-nothing exhaustion, usage, the
// RAII page list, and concurrent use.
#include <set>
#include <thread>

#include <gtest/gtest.h>
#include <torch/script.h>

#include "core/model/kv_page_pool.h"

namespace dysco {
namespace {

ModelConfig TinyConfig() {
  ModelConfig c;
  c.num_layers = 2;
  c.num_attention_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.vocab_size = 100;
  c.dtype = ModelDtype::kFloat32;
  return c;
}

std::unique_ptr<KvPagePool> MakePool(int64_t pages, int page_size = 4, bool padding = true) {
  KvPagePoolOptions o;
  o.num_pages = pages;
  o.page_size = page_size;
  o.reserve_padding_page = padding;
  auto pool = KvPagePool::Create(TinyConfig(), o);
  EXPECT_TRUE(pool.ok()) << pool.status().ToString();
  return std::move(pool).value();
}

TEST(KvPagePoolTest, TensorShapeAndDtype) {
  auto pool = MakePool(10, 4);
  const at::Tensor& kv = pool->kv_cache();
  EXPECT_EQ(kv.sizes(), at::IntArrayRef({2, 2, 11, 4, 2, 8}));  // 10 usable + padding page
  EXPECT_EQ(kv.scalar_type(), at::kFloat);
  EXPECT_EQ(pool->num_total(), 10);
  EXPECT_EQ(pool->num_pages_in_tensor(), 11);
  EXPECT_EQ(pool->bytes_per_page(), 2 * 2 * 4 * 2 * 8 * 4);
  EXPECT_EQ(pool->tensor_bytes(), 11 * pool->bytes_per_page());

  ModelConfig bf = TinyConfig();
  bf.dtype = ModelDtype::kBFloat16;
  KvPagePoolOptions o;
  o.num_pages = 3;
  auto p2 = KvPagePool::Create(bf, o);
  ASSERT_TRUE(p2.ok());
  EXPECT_EQ((*p2)->kv_cache().scalar_type(), at::kBFloat16);
}

TEST(KvPagePoolTest, SizedFromByteBudget) {
  KvPagePoolOptions o;
  o.page_size = 4;
  const int64_t per_page = 2 * 2 * 4 * 2 * 8 * 4;
  o.max_bytes = per_page * 7 + per_page / 2;  // room for 7 pages: 6 usable + padding
  auto pool = KvPagePool::Create(TinyConfig(), o);
  ASSERT_TRUE(pool.ok()) << pool.status().ToString();
  EXPECT_EQ((*pool)->num_total(), 6);
  EXPECT_LE((*pool)->tensor_bytes(), o.max_bytes);

  o.max_bytes = per_page;  // only the padding page fits
  auto small = KvPagePool::Create(TinyConfig(), o);
  ASSERT_FALSE(small.ok());
  EXPECT_EQ(small.status().code(), StatusCode::kInvalidArgument);

  o.max_bytes = 0;
  EXPECT_EQ(KvPagePool::Create(TinyConfig(), o).status().code(), StatusCode::kInvalidArgument);
  o.num_pages = 4;
  o.page_size = 0;
  EXPECT_EQ(KvPagePool::Create(TinyConfig(), o).status().code(), StatusCode::kInvalidArgument);
  o.page_size = 4;
  o.device = "no-such-device";
  EXPECT_FALSE(KvPagePool::Create(TinyConfig(), o).ok());
}

// memory_fraction sizes the pool from a CUDA device's free memory: refused for a CPU pool and out
// of range; num_pages still wins over it. (Sized on a GPU: scripts/gpu-check.sh's dysco-server
// row.)
TEST(KvPagePoolTest, MemoryFractionNeedsACudaDevice) {
  KvPagePoolOptions o;
  o.page_size = 4;
  o.max_bytes = 1 << 20;
  o.memory_fraction = 0.5;
  auto pool = KvPagePool::Create(TinyConfig(), o);
  ASSERT_FALSE(pool.ok());
  EXPECT_EQ(pool.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(pool.status().message().find("memory_fraction"), std::string::npos)
      << pool.status().message();
  for (double bad : {-0.1, 1.5}) {
    o.memory_fraction = bad;
    o.device = "cuda:0";  // the range is checked before the device is touched
    auto out_of_range = KvPagePool::Create(TinyConfig(), o);
    ASSERT_FALSE(out_of_range.ok()) << bad;
    EXPECT_EQ(out_of_range.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(out_of_range.status().message().find("(0, 1]"), std::string::npos);
  }
  o.device = "cpu";
  o.memory_fraction = 0.5;
  o.num_pages = 3;  // an exact page count wins over the fraction
  pool = KvPagePool::Create(TinyConfig(), o);
  ASSERT_TRUE(pool.ok()) << pool.status().ToString();
  EXPECT_EQ((*pool)->num_total(), 3);
  EXPECT_EQ((*pool)->device_free_bytes(), 0);
}

TEST(KvPagePoolTest, AllocateFreeAndUsage) {
  auto pool = MakePool(8);
  EXPECT_EQ(pool->num_free(), 8);
  EXPECT_DOUBLE_EQ(pool->usage_ratio(), 0.0);
  auto a = pool->Allocate(3);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(a->size(), 3u);
  auto b = pool->Allocate(5);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(pool->num_free(), 0);
  EXPECT_DOUBLE_EQ(pool->usage_ratio(), 1.0);
  std::set<int32_t> all(a->begin(), a->end());
  all.insert(b->begin(), b->end());
  EXPECT_EQ(all.size(), 8u) << "pages handed out twice";
  EXPECT_EQ(all.count(0), 0u) << "padding page handed out";
  for (int32_t p : all) {
    EXPECT_GE(p, 1);
    EXPECT_LT(p, 9);
  }
  ASSERT_TRUE(pool->Free(*a).ok());
  EXPECT_EQ(pool->num_free(), 3);
  EXPECT_DOUBLE_EQ(pool->usage_ratio(), 5.0 / 8.0);
  auto c = pool->Allocate(3);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(std::set<int32_t>(c->begin(), c->end()), std::set<int32_t>(a->begin(), a->end()));
  ASSERT_TRUE(pool->Free(*b).ok());
  ASSERT_TRUE(pool->Free(*c).ok());
  EXPECT_EQ(pool->num_free(), 8);
  auto zero = pool->Allocate(0);
  ASSERT_TRUE(zero.ok());
  EXPECT_TRUE(zero->empty());
}

TEST(KvPagePoolTest, ExhaustionIsAllOrNothing) {
  auto pool = MakePool(5);
  auto a = pool->Allocate(3);
  ASSERT_TRUE(a.ok());
  auto b = pool->Allocate(3);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(pool->num_free(), 2) << "a failed allocation must take nothing";
  EXPECT_TRUE(pool->Allocate(2).ok());
  EXPECT_EQ(pool->Allocate(1).status().code(), StatusCode::kResourceExhausted);
}

TEST(KvPagePoolTest, FreeRejectsBadIdsAndFreesNothing) {
  auto pool = MakePool(4);
  auto a = pool->Allocate(2);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(pool->Free({(*a)[0], 0}).code(), StatusCode::kInvalidArgument);  // padding page
  EXPECT_EQ(pool->num_free(), 2);
  EXPECT_EQ(pool->Free({(*a)[0], (*a)[0]}).code(), StatusCode::kInvalidArgument);  // twice
  EXPECT_EQ(pool->num_free(), 2);
  EXPECT_EQ(pool->Free({99}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->Free({-1}).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(pool->Free(*a).ok());
  EXPECT_EQ(pool->Free(*a).code(), StatusCode::kInvalidArgument);  // double free
  EXPECT_EQ(pool->num_free(), 4);
}

TEST(KvPagePoolTest, WithoutPaddingPageEveryPageIsUsable) {
  auto pool = MakePool(3, 4, /*padding=*/false);
  EXPECT_EQ(pool->num_pages_in_tensor(), 3);
  auto a = pool->Allocate(3);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(std::set<int32_t>(a->begin(), a->end()), std::set<int32_t>({0, 1, 2}));
}

TEST(KvPagePoolTest, PagesForTokens) {
  auto pool = MakePool(4, 16);
  EXPECT_EQ(pool->pages_for_tokens(0), 0);
  EXPECT_EQ(pool->pages_for_tokens(1), 1);
  EXPECT_EQ(pool->pages_for_tokens(16), 1);
  EXPECT_EQ(pool->pages_for_tokens(17), 2);
  EXPECT_EQ(pool->pages_for_tokens(160), 10);
}

TEST(KvPagePoolTest, PageListGrowsAndFreesOnDestruction) {
  auto pool = MakePool(6, 4);
  {
    PageList list(pool.get());
    ASSERT_TRUE(list.EnsureCapacity(5).ok());
    EXPECT_EQ(list.ids().size(), 2u);
    EXPECT_EQ(list.capacity_tokens(), 8);
    ASSERT_TRUE(list.EnsureCapacity(8).ok());
    EXPECT_EQ(list.ids().size(), 2u);
    ASSERT_TRUE(list.EnsureCapacity(9).ok());
    EXPECT_EQ(list.ids().size(), 3u);
    EXPECT_EQ(pool->num_free(), 3);
    EXPECT_EQ(list.EnsureCapacity(100).code(), StatusCode::kResourceExhausted);
    EXPECT_EQ(list.ids().size(), 3u);
    PageList moved = std::move(list);
    EXPECT_EQ(moved.ids().size(), 3u);
    EXPECT_EQ(pool->num_free(), 3);
  }
  EXPECT_EQ(pool->num_free(), 6);
  EXPECT_DOUBLE_EQ(pool->usage_ratio(), 0.0);
}

TEST(KvPagePoolTest, ConcurrentAllocateFree) {
  auto pool = MakePool(64, 4);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        auto a = pool->Allocate(1 + (i + t) % 8);
        if (!a.ok()) continue;  // others hold pages right now
        if (!pool->Free(*a).ok()) failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(pool->num_free(), 64);
}

}  // namespace
}  // namespace dysco
