#include <gtest/gtest.h>
#include "runtime/tensor.h"
TEST(Tensor, ViewAndSlice) {
  auto t = ievo::Tensor::from_vector(std::vector<float>{0,1,2,3,4,5}, {2,3});
  auto s = t.slice(1, 1, 3);
  EXPECT_EQ(s.shape(), (ievo::Shape{2,2}));
  EXPECT_FALSE(s.is_contiguous());
  auto c = s.clone();
  EXPECT_EQ(c.item(0), 1.0); EXPECT_EQ(c.item(3), 5.0);
  EXPECT_EQ(t.view({3,-1}).size(1), 2);
}

// A column slice of a wider matrix views as [N, H, hd] and back (the joint QKV output's q);
// merging dimensions that are not laid out together is refused by name.
TEST(Tensor, ViewOfRowStridedSlice) {
  std::vector<float> v(4 * 10);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  auto m = ievo::Tensor::from_vector(v, {4, 10});
  auto q = m.slice(1, 2, 8);  // [4, 6], row stride 10
  EXPECT_TRUE(q.rows_contiguous());
  EXPECT_EQ(q.row_stride(), 10);
  auto h = q.view({4, 3, 2});
  EXPECT_EQ(h.strides(), (ievo::Shape{10, 2, 1}));
  EXPECT_EQ(h.item(0), 2.0);
  EXPECT_EQ(h.clone().item(2 * 6 + 1 * 2 + 1), 2 * 10 + 2 + 3.0);  // row 2, head 1, element 1
  EXPECT_EQ(h.view({4, -1}).strides(), (ievo::Shape{10, 1}));
  auto t = ievo::Tensor::from_vector(v, {4, 10}).slice(0, 0, 2);  // contiguous rows
  EXPECT_TRUE(t.is_contiguous());
  try {
    (void)q.view({24});
    FAIL() << "merging strided rows should be refused";
  } catch (const ievo::Error& e) {
    EXPECT_NE(std::string(e.what()).find("without a copy"), std::string::npos) << e.what();
  }
  auto cols = m.slice(0, 0, 4).slice(1, 0, 1).view({4});  // a column: stride 10
  EXPECT_EQ(cols.strides(), (ievo::Shape{10}));
  EXPECT_FALSE(m.slice(1, 0, 6).view({4, 3, 2}).slice(2, 0, 1).rows_contiguous());
}

// Copies between packed and row-strided tensors (both ways), and clone of a strided one.
TEST(Tensor, CopyRowStrided) {
  std::vector<float> v(3 * 5);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  auto m = ievo::Tensor::from_vector(v, {3, 5});
  auto dst = ievo::Tensor::zeros({3, 8}, ievo::DType::F32);
  auto cols = dst.slice(1, 2, 7);
  cols.copy_from(m);
  EXPECT_EQ(dst.item(0 * 8 + 2), 0.0);
  EXPECT_EQ(dst.item(1 * 8 + 6), 9.0);
  EXPECT_EQ(dst.item(1 * 8 + 7), 0.0);  // outside the slice: untouched
  auto back = ievo::Tensor::empty({3, 5}, ievo::DType::F32);
  back.copy_from(cols);
  for (int64_t i = 0; i < 15; ++i) EXPECT_EQ(back.item(i), v[i]);
  auto c = cols.clone();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c.item(14), 14.0);
}

// adjacent_view: parts stored back to back along a dimension view as one; anything else
// (a gap, another order, another storage, other shapes) gives an undefined tensor.
TEST(Tensor, AdjacentView) {
  auto flat = ievo::Tensor::zeros({64}, ievo::DType::F32);
  auto a = flat.slice(0, 0, 12).view({3, 4}), b = flat.slice(0, 12, 20).view({2, 4}),
       c = flat.slice(0, 24, 32).view({2, 4});
  auto ab = ievo::adjacent_view({a, b}, 0);
  ASSERT_TRUE(ab.defined());
  EXPECT_EQ(ab.shape(), (ievo::Shape{5, 4}));
  EXPECT_EQ(ab.raw(), a.raw());
  EXPECT_TRUE(ab.is_contiguous());
  EXPECT_FALSE(ievo::adjacent_view({a, c}, 0).defined());  // a gap of 4
  EXPECT_FALSE(ievo::adjacent_view({b, a}, 0).defined());  // the wrong order
  EXPECT_FALSE(ievo::adjacent_view({a, ievo::Tensor::zeros({2, 4}, ievo::DType::F32)}, 0).defined());
  EXPECT_FALSE(ievo::adjacent_view({a, flat.slice(0, 12, 18).view({2, 3})}, 0).defined());
  // Column slices of one matrix, along dimension 1.
  auto m = ievo::Tensor::zeros({3, 10}, ievo::DType::F32);
  auto cq = m.slice(1, 0, 6), ck = m.slice(1, 6, 8), cv = m.slice(1, 8, 10);
  auto qkv = ievo::adjacent_view({cq, ck, cv}, 1);
  ASSERT_TRUE(qkv.defined());
  EXPECT_EQ(qkv.shape(), (ievo::Shape{3, 10}));
  EXPECT_TRUE(qkv.is_contiguous());
  EXPECT_FALSE(ievo::adjacent_view({cq, cv}, 1).defined());
  EXPECT_FALSE(ievo::adjacent_view({cq, ck}, 0).defined());
}
