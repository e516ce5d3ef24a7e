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
